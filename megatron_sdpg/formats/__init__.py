"""File formats below both the HF <-> Megatron conversion (``weights``) and the weight sync (``rollout.sync``).

safetensors (files, streamed HTTP bodies, the ``/update_weights_from_tensor`` encodings),
HF checkpoint directories and ``torch_dist`` reads. Imports nothing else of ``megatron_sdpg``;
inside: ``safetensors_format`` <- ``safetensors_stream`` <- ``tensor_codec``, ``hf_io``, ``checkpoint_read``.
"""
