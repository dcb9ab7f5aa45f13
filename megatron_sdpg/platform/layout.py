"""The parallel layout: validated degrees, data-parallel size inferred from the world."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.config.errors import ConfigError


@dataclass
class ParallelConfig:
    """Parallel degrees as the user writes them (config section ``parallel``).

    Attributes:
        tp: Tensor-parallel size (vocabulary and attention heads are split by it).
        pp: Pipeline-parallel size (layers are split by it).
        vpp: Virtual pipeline stages per rank (interleaved 1F1B); ``None`` for off.
        cp: Context-parallel size; must be 1 until sequences are split per CP rank.
        ep: Expert-parallel size (MoE models only).
        sequence_parallel: Megatron sequence parallelism (needs TE or apex norms; GPU only).
        use_distributed_optimizer: Shard optimizer state across data-parallel ranks.
        nodes: Training nodes of the cluster layout this config is written for (0: not
            set). The Slurm scripts (``TRAIN_NODES`` default) and the planner (``--nodes``
            default) both read it; the trainer takes its world size from the launcher.
        gpus_per_node: Trainer ranks per node of that layout (scripts' ``GPUS_PER_NODE``
            default, planner's ``--gpus-per-node`` default).
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    nodes: int = 0
    gpus_per_node: int = 8

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.cp > 1:
            # Nothing splits sequences per CP rank yet: every CP rank would get whole sequences and
            # the response rows would index full-length logits (silently wrong with TE attention).
            raise ConfigError(f"{prefix}.cp", f"context parallelism (cp={self.cp}) is not implemented: "
                              "sequences are not split per CP rank; set parallel.cp=1")
        if self.nodes < 0:
            raise ConfigError(f"{prefix}.nodes", f"must be >= 0 (0: not set), got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ConfigError(f"{prefix}.gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        if self.vpp is not None:
            if self.vpp < 1:
                raise ConfigError(f"{prefix}.vpp", f"must be >= 1 or null, got {self.vpp}")
            if self.pp == 1 and self.vpp > 1:
                raise ConfigError(f"{prefix}.vpp", "virtual pipeline stages need pp > 1")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(f"{prefix}.sequence_parallel", "needs tp > 1")


@dataclass(frozen=True)
class ParallelLayout:
    """Resolved degrees for a given world size (``dp = world / (tp*pp*cp)``)."""

    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    vpp: int | None
    world_size: int

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int, prefix: str = "parallel") -> "ParallelLayout":
        """Validates ``cfg`` against ``world_size`` and infers ``dp``.

        Raises:
            ConfigError: naming the field, e.g. ``parallel.tp: tp*pp*cp=6 does not
                divide world size 4``.
        """
        cfg.validate(prefix)
        model_parallel = cfg.tp * cfg.pp * cfg.cp
        if world_size % model_parallel:
            raise ConfigError(
                f"{prefix}.tp",
                f"tp*pp*cp={model_parallel} (tp={cfg.tp}, pp={cfg.pp}, cp={cfg.cp}) "
                f"does not divide world size {world_size}",
            )
        dp = world_size // model_parallel
        if (dp * cfg.cp) % cfg.ep:
            raise ConfigError(f"{prefix}.ep", f"ep={cfg.ep} does not divide dp*cp={dp * cfg.cp}")
        return cls(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep, dp=dp, vpp=cfg.vpp, world_size=world_size)

    def describe(self) -> str:
        """One line such as ``tp2 pp1 cp1 ep1 dp2 (world 4)``."""
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        return f"tp{self.tp} pp{self.pp}{vpp} cp{self.cp} ep{self.ep} dp{self.dp} (world {self.world_size})"
