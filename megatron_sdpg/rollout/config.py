"""Configuration of the rollout engines, the rollout client and weight sync.

One ``RolloutConfig`` section holds everything the trainer needs to produce
rollouts: which engines serve them (SGLang on GPU clusters, our CPU server for
laptops and tests), how to reach or launch them, how to sample, how patient the
client is, and how new weights reach the engines after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_sdpg.config.errors import require

ENGINE_KINDS = ("cpu", "sglang")
SYNC_STRATEGIES = ("disk", "tensor", "distributed")
# ``algorithm.tis_cap`` when ``off_policy_steps=1`` leaves it null: min(pi_old / pi_rollout, 2) on the policy gradient.
OFF_POLICY_TIS_CAP = 2.0


@dataclass
class SamplingConfig:
    """SGLang sampling parameters sent with every ``/generate`` request.

    ``temperature=0`` means greedy (SGLang turns it into ``top_k=1``, temperature 1).
    ``top_k=-1`` means the whole vocabulary. ``seed`` (optional) makes sampling
    reproducible: sample ``k`` of group ``g`` in a batch gets ``sampling_seed =
    seed + g * n + k`` (SGLang's per-request ``sampling_seed``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def validate(self, prefix: str) -> None:
        require(self.temperature >= 0.0, f"{prefix}.temperature", f"must be >= 0, got {self.temperature}")
        require(0.0 < self.top_p <= 1.0, f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k == -1 or self.top_k >= 1, f"{prefix}.top_k", f"must be -1 (all) or >= 1, got {self.top_k}")
        require(self.max_new_tokens >= 0, f"{prefix}.max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        require(all(t >= 0 for t in self.stop_token_ids), f"{prefix}.stop_token_ids", "token ids must be >= 0")


@dataclass
class RolloutConfig:
    """The ``rollout`` section.

    Attributes:
        engine: ``cpu`` (our transformers server, not for production) or ``sglang``.
        urls: Base URLs of running engines (or of one ``sglang-router``). Empty means
            "launch ``num_engines`` engines" with the launch settings below.
        num_engines: Engines to launch when ``urls`` is empty.
        model_path: HF checkpoint directory the launched engines load first; empty
            means ``model.hf_dir`` (the trainer fills it in).
        host: Address launched engines bind to (loopback unless told otherwise).
        base_port: First port of launched engines (engine i listens on base_port + i).
        tp_size: Tensor-parallel size of each launched SGLang engine.
        log_dir: Where launched engines write their logs.
        startup_timeout_s: How long a launched engine may take to become healthy.
        sglang_args: Extra SGLang server options, passed through as ``--key value``
            (``True`` gives a bare flag, ``False``/``None`` omit it).
        colocate: The engines share the trainer's GPUs. Launched SGLang engines get
            ``--enable-memory-saver``; every step releases the engines' memory (weights,
            KV cache, CUDA graphs) before the training passes and resumes it before the
            weight sync (``/release_memory_occupation``, ``/resume_memory_occupation``).
        deterministic: Launched SGLang engines get ``--enable-deterministic-inference``.
            SGLang honours ``sampling_seed`` only with it: without it, seeded rollouts are
            not reproducible. (The CPU server is always deterministic per seed.)
        n_samples: Samples per prompt (a group).
        sampling: Sampling parameters.
        request_timeout_s: Total timeout of one ``/generate`` call.
        connect_timeout_s: TCP connect timeout.
        max_retries: Extra attempts per request after the first (on another engine
            when there is one).
        backoff_s: First retry delay; doubles each attempt, capped at ``backoff_max_s``.
        backoff_max_s: Cap of the retry delay.
        max_inflight_per_engine: Concurrent ``/generate`` requests per engine.
        sync_strategy: ``disk``, ``tensor`` or ``distributed`` (NCCL on GPU, gloo on CPU).
        sync_bucket_mb: Bucket size of the tensor and distributed strategies.
        sync_dir: Directory the disk strategy writes HF checkpoints into.
        distributed_backend: Backend of the weight-update group (``nccl`` for SGLang).
        sync_master_address: Address the engines reach the trainer's global rank 0 at,
            where it hosts the weight-update group (``distributed``). Empty means rank 0's
            own host name. The Slurm scripts pass ``${oc.env:SLURMD_NODENAME}``: each rank
            resolves it to its own node's Slurm name, and rank 0's is used.
        sync_master_port: Port of that group's rendezvous on rank 0's node; 0 means rank 0
            picks a free one at start-up.
        post_sync_check_threshold: Max |Δ log-prob| allowed by the post-sync probe;
            ``None`` disables the check.
        off_policy_steps: ``0`` (default): strictly on-policy, each step's samples come from
            the weights that train on them. ``1``: one-step-off-policy overlap; the engines
            generate step k+1's samples with the weights step k starts from while the
            trainer updates on step k's, and the loss's rollout log-probs (TIS, SG[rho])
            correct for the one step of staleness (``docs/rollout.md``, "Overlap");
            ``algorithm.tis_cap`` left null becomes ``OFF_POLICY_TIS_CAP`` (2.0).
    """

    engine: str = "cpu"
    urls: list[str] = field(default_factory=list)
    num_engines: int = 1
    model_path: str = ""
    host: str = "127.0.0.1"
    base_port: int = 30000
    tp_size: int = 1
    log_dir: str = "runs/engines"
    startup_timeout_s: float = 600.0
    sglang_args: dict[str, Any] = field(default_factory=dict)
    colocate: bool = False
    deterministic: bool = False
    n_samples: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    max_inflight_per_engine: int = 64
    sync_strategy: str = "disk"
    sync_bucket_mb: float = 512.0
    sync_dir: str = "runs/weight_sync"
    distributed_backend: str = "nccl"
    sync_master_address: str = ""
    sync_master_port: int = 0
    post_sync_check_threshold: float | None = 1e-3
    off_policy_steps: int = 0

    def validate(self, prefix: str) -> None:
        require(self.engine in ENGINE_KINDS, f"{prefix}.engine", f"must be one of {ENGINE_KINDS}, got {self.engine!r}")
        for i, url in enumerate(self.urls):
            require(
                url.startswith(("http://", "https://")),
                f"{prefix}.urls[{i}]",
                f"must start with http:// or https://, got {url!r}",
            )
        if not self.urls:
            require(self.num_engines >= 1, f"{prefix}.num_engines", "must be >= 1 when urls is empty")
            require(1 <= self.base_port <= 65535 - self.num_engines, f"{prefix}.base_port", "out of range")
        require(self.tp_size >= 1, f"{prefix}.tp_size", f"must be >= 1, got {self.tp_size}")
        require(self.engine == "sglang" or self.tp_size == 1, f"{prefix}.tp_size", "the cpu engine has no TP")
        require(self.n_samples >= 1, f"{prefix}.n_samples", f"must be >= 1, got {self.n_samples}")
        self.sampling.validate(f"{prefix}.sampling")
        for name in ("request_timeout_s", "connect_timeout_s", "startup_timeout_s", "backoff_max_s"):
            require(getattr(self, name) > 0, f"{prefix}.{name}", "must be > 0")
        require(self.backoff_s >= 0, f"{prefix}.backoff_s", "must be >= 0")
        require(self.max_retries >= 0, f"{prefix}.max_retries", "must be >= 0")
        require(self.max_inflight_per_engine >= 1, f"{prefix}.max_inflight_per_engine", "must be >= 1")
        require(
            self.sync_strategy in SYNC_STRATEGIES,
            f"{prefix}.sync_strategy",
            f"must be one of {SYNC_STRATEGIES}, got {self.sync_strategy!r}",
        )
        require(self.sync_bucket_mb > 0, f"{prefix}.sync_bucket_mb", "must be > 0")
        require(self.distributed_backend in ("nccl", "gloo"), f"{prefix}.distributed_backend", "must be nccl or gloo")
        require(0 <= self.sync_master_port <= 65535, f"{prefix}.sync_master_port",
                f"must be 0 (pick a free port) or a port number, got {self.sync_master_port}")
        require(
            not (self.engine == "cpu" and self.sync_strategy == "distributed" and self.distributed_backend == "nccl"),
            f"{prefix}.distributed_backend",
            "the cpu engine only joins gloo groups",
        )
        require(
            self.post_sync_check_threshold is None or self.post_sync_check_threshold > 0,
            f"{prefix}.post_sync_check_threshold",
            "must be > 0 or null",
        )
        require(
            not (self.colocate and self.engine == "sglang" and self.sync_strategy == "distributed"),
            f"{prefix}.sync_strategy",
            "colocated SGLang engines share the trainer's GPUs, and NCCL cannot join two ranks on one GPU: "
            "use tensor (CUDA IPC) or disk",
        )
        require(type(self.off_policy_steps) is int and self.off_policy_steps in (0, 1), f"{prefix}.off_policy_steps",
                f"must be 0 (on-policy) or 1 (generation overlaps the update), got {self.off_policy_steps!r}")
        require(not (self.off_policy_steps and self.colocate), f"{prefix}.off_policy_steps",
                "1 overlaps generation with the training passes, which colocated engines "
                "(rollout.colocate=true) cannot: they release their memory for the passes")
        for key in self.sglang_args:
            require(
                isinstance(key, str) and key and not key.startswith("-"),
                f"{prefix}.sglang_args",
                f"keys are option names without dashes (e.g. mem_fraction_static), got {key!r}",
            )
