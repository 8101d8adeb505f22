"""What `tpcli run` (and `verify --numerics`) launches: one dataclass, read by the launcher (run.py), its checks
(run_checks.py), the job watcher and the failure report, so none of them imports another for it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LaunchSpec:
    script: str | None = None
    module: str | None = None
    args: list[str] = field(default_factory=list)
    gpus: int | None = None
    cpu: int | None = None
    model: str | None = None
    plan_file: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "tpcli"
    max_restarts: int = 0
    log_dir: str | None = None
    tee: str | None = None
    ranks_filter: str | None = None
    preflight: bool = True
    quiet: bool = False  # keep worker output out of the console (it still goes to the per-rank logs)
    timeout_s: float | None = None  # stop every worker after this many seconds (exit 124)
    raise_on_interrupt: bool = False  # a signal raises LaunchError(exit 128 + signal) instead of returning the code
    worker_stdout_to_stderr: bool = False  # `run --json`: stdout carries only the final JSON object
    tp: int | None = None  # mesh flags; all None: plain TP over the world (no TPCLI_MESH), as before
    fsdp: int | None = None
    dp_replicate: int | None = None
    ep: int | None = None
    pp: int | None = None  # pipeline stages (transformers' pp_size)
    dry_run: bool = False  # print the mesh, the torchrun command and the environment; start nothing

    @property
    def mesh_given(self) -> bool:
        return any(v is not None for v in (self.tp, self.fsdp, self.dp_replicate, self.ep, self.pp))

    @property
    def nproc(self) -> int:
        return self.gpus if self.gpus else (self.cpu or 1)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes
