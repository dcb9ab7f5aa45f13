// Native balance_partitions / split_microbatches for megatron_sdpg.data.packing.
//
// Results are identical to the pure-Python versions in megatron_sdpg/data/packing.py,
// including the order of every list and the text of every ValueError / IndexError.
// Inputs that do not fit int64 raise TypeError or OverflowError, on which the Python
// wrapper falls back to the pure-Python path (so the two can never disagree).

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// A borrowed-item view of any Python sequence (lists and tuples without a copy).
class FastSequence {
 public:
  explicit FastSequence(py::handle obj, const char* what) {
    // Iterators are not accepted: the Python fallback must still see every item.
    if (!PySequence_Check(obj.ptr())) throw py::type_error(what);
    seq_ = py::reinterpret_steal<py::object>(PySequence_Fast(obj.ptr(), what));
    if (!seq_) throw py::error_already_set();
    size_ = PySequence_Fast_GET_SIZE(seq_.ptr());
    items_ = PySequence_Fast_ITEMS(seq_.ptr());
  }
  Py_ssize_t size() const { return size_; }
  PyObject* item(Py_ssize_t i) const { return items_[i]; }

 private:
  py::object seq_;
  Py_ssize_t size_ = 0;
  PyObject** items_ = nullptr;
};

// An integer as int64; TypeError for non-integers, OverflowError beyond int64.
int64_t as_int64(PyObject* obj) {
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow) throw std::overflow_error("integer does not fit int64");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<int64_t>(v);
}

void check_length(int64_t index, int64_t n) {
  if (n < 0) {
    throw py::value_error("lengths[" + std::to_string(index) + "] is " + std::to_string(n) +
                          "; token counts must be >= 0");
  }
}

py::list new_list(Py_ssize_t n) {
  PyObject* list = PyList_New(n);
  if (!list) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(list);
}

int bit_length(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

// Indices by decreasing length, ties by increasing index: a stable LSD radix sort of
// (max_length - length), 11 bits a pass (two passes for lengths below 4M).
std::vector<uint32_t> order_by_decreasing_length(const std::vector<int64_t>& lengths) {
  const size_t n = lengths.size();
  const int64_t max_length = n ? *std::max_element(lengths.begin(), lengths.end()) : 0;
  std::vector<uint32_t> order(n), scratch(n);
  std::iota(order.begin(), order.end(), 0);
  constexpr int kDigitBits = 11;
  constexpr uint64_t kDigitMask = (uint64_t{1} << kDigitBits) - 1;
  std::vector<size_t> start(size_t{1} << kDigitBits);
  for (int shift = 0; shift < bit_length(max_length); shift += kDigitBits) {
    auto digit = [&](uint32_t i) { return (static_cast<uint64_t>(max_length - lengths[i]) >> shift) & kDigitMask; };
    std::fill(start.begin(), start.end(), 0);
    for (uint32_t i : order) ++start[digit(i)];
    size_t sum = 0;
    for (size_t& s : start) sum += std::exchange(s, sum);
    for (uint32_t i : order) scratch[start[digit(i)]++] = i;
    order.swap(scratch);
  }
  return order;
}

// Greedy assignment over a binary min-heap of parts. A part's key packs the tuple
// (load, count, part) into one unsigned integer, load above count above part, so
// integer order is the tuple order of the Python version and every key is unique.
template <typename Key>
void assign_greedy(const std::vector<uint32_t>& order, const std::vector<int64_t>& lengths, size_t n_parts,
                   int count_shift, int load_shift, std::vector<uint32_t>& owner) {
  const Key part_mask = (Key{1} << count_shift) - 1;
  const Key one_more = Key{1} << count_shift;
  // One sentinel above every key after the last part lets the sift pick a child without
  // a bounds check; the pick itself compiles to a branch-free add.
  std::vector<Key> heap(n_parts + 1, ~Key{0});
  for (size_t p = 0; p < n_parts; ++p) heap[p] = Key{p};  // loads and counts zero: a valid heap
  for (uint32_t i : order) {
    const Key top = heap[0];
    owner[i] = static_cast<uint32_t>(top & part_mask);
    const Key value = top + (static_cast<Key>(lengths[i]) << load_shift) + one_more;
    size_t pos = 0;
    for (size_t child = 1; child < n_parts; child = 2 * pos + 1) {  // replace the top, sift down
      child += heap[child + 1] < heap[child];
      if (value < heap[child]) break;
      heap[pos] = heap[child];
      pos = child;
    }
    heap[pos] = value;
  }
}

py::list balance_partitions(py::handle lengths_obj, int64_t n_parts) {
  if (n_parts < 1) throw py::value_error("n_parts must be >= 1, got " + std::to_string(n_parts));
  FastSequence seq(lengths_obj, "lengths must be a sequence");
  const int64_t n = seq.size();
  if (n > UINT32_MAX || n_parts > UINT32_MAX) throw std::overflow_error("more than 2**32 sequences or parts");
  std::vector<int64_t> lengths(n);
  for (int64_t i = 0; i < n; ++i) lengths[i] = as_int64(seq.item(i));
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    check_length(i, lengths[i]);
    if (__builtin_add_overflow(total, lengths[i], &total)) throw std::overflow_error("total length exceeds int64");
  }

  const std::vector<uint32_t> order = order_by_decreasing_length(lengths);
  std::vector<uint32_t> owner(n);
  const int count_shift = bit_length(static_cast<uint64_t>(n_parts - 1));
  const int load_shift = count_shift + bit_length(static_cast<uint64_t>(n));
  const int key_bits = load_shift + bit_length(static_cast<uint64_t>(total));
  if (key_bits <= 64) {
    assign_greedy<uint64_t>(order, lengths, n_parts, count_shift, load_shift, owner);
  } else {  // at most 32 + 33 + 63 bits
    assign_greedy<unsigned __int128>(order, lengths, n_parts, count_shift, load_shift, owner);
  }

  // Visiting indices in increasing order leaves every part sorted.
  std::vector<Py_ssize_t> sizes(n_parts, 0);
  for (uint32_t p : owner) ++sizes[p];
  py::list parts = new_list(n_parts);
  std::vector<PyObject*> views(n_parts);  // borrowed from `parts`
  for (int64_t p = 0; p < n_parts; ++p) {
    views[p] = new_list(sizes[p]).release().ptr();
    PyList_SET_ITEM(parts.ptr(), p, views[p]);
  }
  std::fill(sizes.begin(), sizes.end(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t p = owner[i];
    PyObject* index = PyLong_FromLongLong(i);
    if (!index) throw py::error_already_set();
    PyList_SET_ITEM(views[p], sizes[p]++, index);
  }
  return parts;
}

py::list split_microbatches(py::handle indices_obj, py::handle lengths_obj, int64_t max_sequences,
                            int64_t max_tokens) {
  if (max_sequences < 1) {
    throw py::value_error("max_sequences must be >= 1, got " + std::to_string(max_sequences));
  }
  if (max_tokens < 0) throw py::value_error("max_tokens must be >= 0, got " + std::to_string(max_tokens));
  FastSequence indices(indices_obj, "indices must be a sequence");
  FastSequence lengths(lengths_obj, "lengths must be a sequence");
  const int64_t n_lengths = lengths.size();

  py::list batches = new_list(0);
  py::list current = new_list(0);
  int64_t count = 0;
  int64_t longest = 0;
  for (Py_ssize_t k = 0; k < indices.size(); ++k) {
    PyObject* index_obj = indices.item(k);
    const int64_t i = as_int64(index_obj);
    if (i < 0 || i >= n_lengths) {
      throw py::index_error("index " + std::to_string(i) + " is out of range for " + std::to_string(n_lengths) +
                            " lengths");
    }
    const int64_t n = as_int64(lengths.item(i));
    check_length(i, n);
    if (max_tokens && n > max_tokens) {
      throw py::value_error("sequence " + std::to_string(i) + " has " + std::to_string(n) +
                            " tokens, more than the micro-batch budget of " + std::to_string(max_tokens));
    }
    int64_t new_longest = std::max(longest, n);
    if (count) {
      int64_t padded;
      // An int64 overflow means the padded size is certainly above the int64 budget.
      const bool over_budget = max_tokens && (__builtin_mul_overflow(new_longest, count + 1, &padded) ||
                                              padded > max_tokens);
      if (count >= max_sequences || over_budget) {
        batches.append(current);
        current = new_list(0);
        count = 0;
        new_longest = n;
      }
    }
    current.append(py::handle(index_obj));
    ++count;
    longest = new_longest;
  }
  if (count) batches.append(current);
  return batches;
}

}  // namespace

PYBIND11_MODULE(_packing_native, m) {
  m.doc() = "Native sequence balancing and micro-batching (see megatron_sdpg.data.packing).";
  m.def("balance_partitions", &balance_partitions, py::arg("lengths"), py::arg("n_parts"),
        "LPT split of sequence indices into n_parts groups; identical to balance_partitions_py.");
  m.def("split_microbatches", &split_microbatches, py::arg("indices"), py::arg("lengths"),
        py::arg("max_sequences"), py::arg("max_tokens") = 0,
        "Consecutive micro-batches under count and padded-token budgets; identical to split_microbatches_py.");
}
