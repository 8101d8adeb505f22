"""`make bench`: speed and memory of shard, gather, load and inspect, side by side with the alternatives, in one run.

    python benchmarks/bench.py [--root .cache/bench] [--sizes small,large[,xl]] [--runs 3] [--skip-load]
    make bench BENCH_ARGS="--sizes small,large,xl"

Builds random bf16 Llama checkpoints locally (cached in ROOT, outside git; xl = 4.5 GB is opt-in: building it takes
minutes), then measures what a user waits for: the whole `tpcli shard` / `tpcli gather` process (start-up included),
paired with `cp -r` of the same folder run alternately (every pair's raw times, medians and ranges of the per-pair
ratios), each run with its input evicted from the page cache (posix_fadvise DONTNEED) and timed until its output is
on the disk (fsync of every output file, after a `sync` before the run); without the layout cache (planned with
transformers: a first run) and with it (a repeat), next to the engine alone (imports done, warm). Each command runs
in its own process; wall, user and system time and peak RSS come from `wait4`. The load comparison runs
`tpcli run --cpu 2`: tpcli.load_model of tpcli's tp=2 shards against transformers' reload of its own
`distributed_checkpoint=True` save, time to a ready model per rank and to the end of its first forward, and the
bytes each rank reads from storage with a cold page cache (/proc/self/io read_bytes after evicting the files with
posix_fadvise). Nothing here is a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # (layers, files) of a 2048-wide Llama (vocab 32000, GQA 16/8 heads): ~0.7 GB, ~1.4 GB and ~4.5 GB in bf16
    "small": (5, 3),
    "large": (12, 3),
    "xl": (48, 26),  # opt-in (--sizes small,large,xl)
}
GB = 1e9


def build_bench_model(root: Path, layers: int, files: int) -> Path:
    """A random bf16 Llama in about `files` safetensors files, written file by file (never the whole model in RAM)."""
    out = root / f"llama-{layers}L-{files}f"
    if (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from tpcli.planning.plan import build_meta_model

    cfg = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                               num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                               tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    meta = build_meta_model(cfg).state_dict()
    tmp = root / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(t.numel() * 2 for t in meta.values())
    split = split_state_dict_into_shards_factory(meta, get_storage_size=lambda t: t.numel() * 2,
                                                 get_storage_id=lambda t: None, max_shard_size=total // files + 1,
                                                 filename_pattern="model{suffix}.safetensors")
    g = torch.Generator().manual_seed(0)
    for fname, names in split.filename_to_tensors.items():
        tensors = {n: (torch.randn(meta[n].shape, generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm(p: Path) -> None:
    for f in p.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


MEASURE = """
import json, os, subprocess, sys, time, resource
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
w = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": w, "rss": r.ru_maxrss * 1024, "user": r.ru_utime, "sys": r.ru_stime, "rc": p.returncode,
                  "out": p.stdout[-20000:], "err": p.stderr[-4000:]}))
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` from a fresh parent (RUSAGE_CHILDREN only grows): wall, user, sys (s), rss (GB), out."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], env=env, capture_output=True, text=True)
    res = json.loads(proc.stdout)
    if res["rc"]:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{res['out'][-2000:]}\n{res['err']}")
    res["rss"] /= GB
    return res


def evict(folder: Path) -> None:
    """Drop the files' pages from the page cache (`posix_fadvise(DONTNEED)` after `fdatasync`: no root needed; a
    page another process maps stays), so the next run reads them from storage."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def to_disk(folder: Path) -> float:
    """Seconds to `fsync` every file and folder under `folder`: added to a run's wall time, so a command is timed
    until its output is on the disk, not until it sits in the page cache."""
    t = time.perf_counter()
    for f in [*folder.rglob("*"), folder]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t


def cold_to_disk(cmd: list[str], source: Path, out: Path, env: dict | None) -> dict:
    """One timed run: `sync` (no earlier run's dirty pages left to throttle this one's writes), `source` evicted
    from the page cache, then `cmd`, timed until `out` is on the disk (wall + `to_disk(out)`)."""
    os.sync()
    evict(source)
    res = measure(cmd, env)
    res["wall"] += to_disk(out)
    return res


def paired(runs: int, cmd: list[str], source: Path, out: Path, env: dict) -> tuple[dict, dict]:
    """`cmd` (reading `source`, writing `out`) and `cp -r source out`, alternately, each into a fresh folder, each
    with `source` evicted from the page cache and timed to the disk (`cold_to_disk`).

    Returns (tpcli figures, cp figures): medians of wall/user/sys, max RSS, and the per-pair ratios."""
    ours, cps = [], []
    copy = out.with_name(out.name + "-cp")
    for i in range(runs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):  # alternate who goes first: drift hits both alike
            if which == 0:
                shutil.rmtree(out, ignore_errors=True)
                ours.append(cold_to_disk(cmd, source, out, env))
            else:
                cps.append(cold_to_disk(["cp", "-r", source, copy], source, copy, None))
                shutil.rmtree(copy)
    ratios = sorted(o["wall"] / c["wall"] for o, c in zip(ours, cps, strict=True))
    med = {k: statistics.median(r[k] for r in ours) for k in ("wall", "user", "sys")}
    med |= {"rss": max(r["rss"] for r in ours), "ratio": statistics.median(ratios), "lo": ratios[0], "hi": ratios[-1],
            "out": ours[-1]["out"], "pairs": [(o["wall"], c["wall"]) for o, c in zip(ours, cps, strict=True)]}
    return med, {k: statistics.median(r[k] for r in cps) for k in ("wall", "user", "sys")}


def pairs_text(figures: dict) -> str:
    """Every pair's ratio with both raw times, in run order: a slow `cp` day shows as a large cp time."""
    return "; ".join(f"{o / c:.2f}x = {o:.2f}/{c:.2f} s" for o, c in figures["pairs"])


TRANSFORMERS_SAVE = """
import sys, torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], distributed_config=DistributedConfig(tp_plan="auto"))
m.save_pretrained(sys.argv[2], distributed_checkpoint=True)
"""

ENGINE = """
import json, sys, time, tempfile, shutil
from tpcli.commands.shard import shard_checkpoint
from tpcli.commands.gather import gather_checkpoint
from tpcli.testing import build_tiny
tmp = tempfile.mkdtemp()
warm = build_tiny("llama", tmp + "/tiny")  # pay every import and lazy init once, outside the timings
gather_checkpoint(shard_checkpoint(str(warm), tp=2, out=tmp + "/s")["out"], out=tmp + "/g")
src, work = sys.argv[1], sys.argv[2]
t = time.perf_counter(); shard_checkpoint(src, tp=2, out=work + "/e-tp2"); s = time.perf_counter() - t
t = time.perf_counter(); gather_checkpoint(work + "/e-tp2", out=work + "/e-merged"); g = time.perf_counter() - t
shutil.rmtree(tmp)
print(json.dumps({"shard": s, "gather": g}))
"""

LOAD_WORKER = """
import json, os, sys, time, gc
from datetime import timedelta
import torch, torch.distributed as dist
if not dist.is_initialized():
    dist.init_process_group("gloo", timeout=timedelta(seconds=900))
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
import tpcli
tpcli_dir, tf_dir, out = sys.argv[1:4]
rank = dist.get_rank()

def read_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

def evict(folder):  # drop the folder's pages from the page cache (rank 0 only; both ranks wait)
    if rank == 0:
        for f in os.listdir(folder):
            fd = os.open(os.path.join(folder, f), os.O_RDONLY)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    dist.barrier()

IDS = torch.tensor([[1]])

def timed(fn, folder=None):
    # time to a ready model, then to the end of its first forward (1 token): every weight is used at least once,
    # so pages a load maps instead of reading are paid for there; bytes read from storage over both
    if folder:
        evict(folder)
    dist.barrier(); b = read_bytes(); t = time.perf_counter()
    m = fn(); dt = time.perf_counter() - t
    with torch.no_grad():
        m(IDS)
    dt_fwd = time.perf_counter() - t; b = read_bytes() - b
    dist.barrier(); del m; gc.collect(); return dt, dt_fwd, b

ours = lambda: tpcli.load_model(tpcli_dir)
theirs = lambda: AutoModelForCausalLM.from_pretrained(tf_dir, distributed_config=DistributedConfig(tp_plan="auto"))
contestants = [("tpcli", ours), ("transformers", theirs)]
timed(ours); timed(theirs)  # first touch: lazy imports and the page cache
res = {"rank": rank}
for _ in range(3):  # alternately: drift in the machine's load hits both alike; best of three
    for name, fn in contestants:
        ready, fwd, _ = timed(fn)
        res[name + "_warm"] = min(res.get(name + "_warm", ready), ready)
        res[name + "_warm_fwd"] = min(res.get(name + "_warm_fwd", fwd), fwd)
res["tpcli_cold"], res["tpcli_cold_fwd"], res["tpcli_read"] = timed(ours, tpcli_dir)
res["transformers_cold"], res["transformers_cold_fwd"], res["transformers_read"] = timed(theirs, tf_dir)
json.dump(res, open(os.path.join(out, f"load-{rank}.json"), "w"))
dist.barrier(); dist.destroy_process_group()
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py")
    parser.add_argument("--root", default=".cache/bench", help="checkpoints (kept) and scratch space")
    parser.add_argument("--sizes", default="small,large", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per command (medians)")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--only-gather", action="store_true",
                        help="gather and verify DIR only (the tp=2 folder is sharded once, untimed; no load rows)")
    parser.add_argument("--skip-train", action="store_true", help="no training-checkpoint rows (DCP, verl)")
    parser.add_argument("--only-train", action="store_true",
                        help="only the training-checkpoint rows: FSDP2 DCP / verl files gathered by tpcli and by "
                             "`accelerate merge-weights`, at the first size in --sizes")
    parser.add_argument("--only-load", action="store_true",
                        help="only the load comparison (shard to tp=2 once, untimed), at every size in --sizes")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes {unknown[0]}: pick from {', '.join(SIZES)}")
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = root / "work"
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore", "TPCLI_CACHE_DIR": "off",
           # the tpcli being measured, also in torchrun workers (whose sys.path starts at the script's folder)
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    tpcli_cmd = [py, "-m", "tpcli"]
    rows: list[tuple[str, str, str, str]] = []
    load_before = os.getloadavg()

    def row(metric, value, ratio="", target=""):
        rows.append((metric, value, ratio, target))
        print(f"  {metric}: {value}  {ratio}  {target}", file=sys.stderr, flush=True)

    times = [measure([*tpcli_cmd, "--help"], env)["wall"] for _ in range(5)]
    row("tpcli --help", f"{statistics.median(times):.2f} s", "", "<= 0.4 s")
    # The floor of every first run (inspect/verify cold, shard/gather without a layout cache entry): planning needs
    # transformers' model classes, and importing them imports torch.
    floor = [measure([py, "-c", "import transformers.models.llama.modeling_llama"], env)["wall"] for _ in range(3)]
    row("floor: python -c 'import transformers.models.llama.modeling_llama'", f"{statistics.median(floor):.2f} s",
        "what every planning (uncached) run pays first")

    for size in sizes:
        layers, nfiles = SIZES[size]
        started = time.perf_counter()
        built = not (root / f"llama-{layers}L-{nfiles}f").exists()
        src = build_bench_model(root, layers, nfiles)
        if built:
            row(f"{size}: build the checkpoint (once, cached in {root})", f"{time.perf_counter() - started:.1f} s")
        nbytes = folder_bytes(src)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        warm(src)
        label = f"{size} ({nbytes / GB:.2f} GB, {len(list(src.glob('*.safetensors')))} files)"
        cached = {**env, "TPCLI_CACHE_DIR": str(work / "layout-cache")}  # `tpcli shard/gather` layout cache on
        largest = _largest_tensor_bytes(src) / GB
        rss_target = f"<= {0.6 + largest:.2f} GB"

        if args.only_train or (size == sizes[0] and not args.skip_train and not args.only_gather and not args.only_load):
            train_rows(label, src, root, work, tpcli_cmd, env, args.runs, row, rss_target)
            if args.only_train:
                break
        if args.only_load:
            measure([*tpcli_cmd, "shard", src, "--tp", "2", "--out", work / "tp2", "--json"], env)
            load_rows(label, src, work, tpcli_cmd, env, row)
            shutil.rmtree(work, ignore_errors=True)
            continue
        if size == sizes[0] and not args.only_gather:
            inspect_rows(src, work, tpcli_cmd, env, row)

        shard_cmd = [*tpcli_cmd, "shard", src, "--tp", "2", "--out", work / "tp2", "--json"]
        if args.only_gather:
            measure(shard_cmd, env)
            gather_rows(label, work, tpcli_cmd, env, cached, args.runs, row, rss_target)
            shutil.rmtree(work, ignore_errors=True)
            continue
        s, cp = paired(args.runs, shard_cmd, src, work / "tp2", env)  # no layout cache: planned with transformers
        measure(shard_cmd + ["--force"], cached)  # plans once, fills the layout cache
        sw, cpw = paired(args.runs, shard_cmd, src, work / "tp2", cached)  # planned from the cache
        os.sync()
        engine = json.loads(measure([py, _script(work, "engine.py", ENGINE), src, work], env)["out"].splitlines()[-1])
        for d in ("e-tp2", "e-merged"):
            shutil.rmtree(work / d, ignore_errors=True)
        row(f"{label} cp -r", f"{cp['wall']:.2f} s", f"user {cp['user']:.1f} s, sys {cp['sys']:.1f} s")
        row(f"{label} tpcli shard tp=2 (whole CLI)", f"{s['wall']:.2f} s (user {s['user']:.1f}, sys {s['sys']:.1f})",
            f"{s['ratio']:.2f}x cp -r ({s['lo']:.2f}-{s['hi']:.2f}, {args.runs} pairs)", "<= 2x cp -r")
        row(f"{label} tpcli shard tp=2 (whole CLI, layout cached)",
            f"{sw['wall']:.2f} s (user {sw['user']:.1f}, sys {sw['sys']:.1f})",
            f"{sw['ratio']:.2f}x cp -r ({sw['lo']:.2f}-{sw['hi']:.2f}; cp {cpw['wall']:.2f} s)", "<= 2x cp -r")
        row(f"{label}   each pair: ratio = tpcli / cp -r", pairs_text(s))
        row(f"{label}   each pair, layout cached", pairs_text(sw))
        row(f"{label} tpcli shard tp=2 (engine, imports done)", f"{engine['shard']:.2f} s",
            f"{engine['shard'] / cp['wall']:.2f}x cp -r")
        row(f"{label} tpcli shard peak RSS", f"{s['rss']:.2f} GB", f"largest tensor {largest:.2f} GB", rss_target)

        gather_rows(label, work, tpcli_cmd, env, cached, args.runs, row, rss_target)
        row(f"{label} tpcli gather (engine, imports done)", f"{engine['gather']:.2f} s")

        if size == sizes[-1] and not args.skip_load:
            load_rows(label, src, work, tpcli_cmd, env, row)
        shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()
    print()
    print(f"tpcli bench: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} at the start, "
          f"{load_after[0]:.1f} at the end; medians of {args.runs} paired runs; shard, gather and cp -r read an "
          "evicted source and are timed to the disk (fsync of the output); warm page cache elsewhere unless 'cold'")
    print(f"{'metric':62} | {'value':36} | {'ratio':46} | target")
    print("-" * 165)
    for metric, value, ratio, target in rows:
        print(f"{metric:62} | {value:36} | {ratio:46} | {target}")


def train_rows(label: str, src: Path, root: Path, work: Path, tpcli_cmd: list[str], env: dict, runs: int, row,
               rss_target: str) -> None:
    """A training checkpoint of `src` written by 2 FSDP2 ranks (accelerate's DCP `pytorch_model_fsdp_0/` and verl's
    per-rank files; built once with tests/oracles/fsdp_save_worker.py, cached in ROOT), gathered by `tpcli gather`
    and, for the DCP folder, by `accelerate merge-weights` (which loads the whole state dict), run alternately."""
    ckpt = root / f"fsdp2-{src.name}"
    if not (ckpt / "verl").is_dir():
        worker = Path(__file__).resolve().parent.parent / "tests" / "oracles" / "fsdp_save_worker.py"
        tmp = root / f".tmp-{ckpt.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(worker), str(src), str(tmp), "--model-only"], env=env, check=True, capture_output=True)
        tmp.rename(ckpt)
    for f in ckpt.rglob("*"):
        if f.is_file():
            warm_file(f)
    merge = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    dcp, verl = ckpt / "pytorch_model_fsdp_0", ckpt / "verl"
    # name: (command, folder it reads, folder it writes, the `cp -r` it is paired with)
    cmds = {"tpcli gather (DCP)": ([*tpcli_cmd, "gather", dcp, "--config", src, "--out", work / "t-dcp", "--json"],
                                   dcp, work / "t-dcp", "cp -r (DCP)"),
            "tpcli gather (verl .pt)": ([*tpcli_cmd, "gather", verl, "--config", src, "--out", work / "t-pt",
                                         "--json"], verl, work / "t-pt", "cp -r (verl)"),
            "cp -r (DCP)": (["cp", "-r", dcp, work / "c-dcp"], dcp, work / "c-dcp", None),
            "cp -r (verl)": (["cp", "-r", verl, work / "c-pt"], verl, work / "c-pt", None)}
    if merge:
        cmds["accelerate merge-weights (DCP)"] = ([merge, "merge-weights", dcp, work / "acc"], dcp, work / "acc",
                                                  "cp -r (DCP)")
    figures: dict[str, list[dict]] = {k: [] for k in cmds}
    for i in range(runs):
        for name in (list(cmds) if i % 2 == 0 else list(cmds)[::-1]):
            cmd, source, out, _ = cmds[name]
            shutil.rmtree(out, ignore_errors=True)
            figures[name].append(cold_to_disk(cmd, source, out, None if cmd[0] == "cp" else env))
    for name, runs_ in figures.items():
        wall = statistics.median(r["wall"] for r in runs_)
        paired_with = cmds[name][3]
        pairs = "" if paired_with is None else pairs_text(
            {"pairs": [(o["wall"], c["wall"]) for o, c in zip(runs_, figures[paired_with], strict=True)]})
        row(f"{label} FSDP2 x2 checkpoint: {name}", f"{wall:.2f} s (user "
            f"{statistics.median(r['user'] for r in runs_):.1f}, sys {statistics.median(r['sys'] for r in runs_):.1f})",
            f"peak RSS {max(r['rss'] for r in runs_):.2f} GB" + (f"; vs {paired_with}: {pairs}" if pairs else ""),
            rss_target if name.startswith("tpcli") else "")
    for _, _, out, _ in cmds.values():
        shutil.rmtree(out, ignore_errors=True)
    if not merge:
        row(f"{label} accelerate merge-weights", "not installed")


def warm_file(f: Path) -> None:
    with open(f, "rb") as fh:
        while fh.read(64 << 20):
            pass


def gather_rows(label: str, work: Path, tpcli_cmd: list[str], env: dict, cached: dict, runs: int, row,
                rss_target: str) -> None:
    """`tpcli gather` of the tp=2 folder paired with `cp -r` of it: a first run (no layout cache), a repeat (cache
    on), and the same folder with a manifest from before the `names` record (planned through transformers, as every
    first run was before); then `verify DIR --quick` and `verify DIR`. Every pair is shown with both raw times."""
    folder = work / "tp2"
    warm(folder)
    gather_cmd = [*tpcli_cmd, "gather", folder, "--out", work / "merged", "--json"]
    g, cp = paired(runs, gather_cmd, folder, work / "merged", env)
    measure(gather_cmd + ["--force"], cached)
    gw, _ = paired(runs, gather_cmd, folder, work / "merged", cached)
    doc = json.loads((folder / "tpcli.json").read_text())
    old = dict(doc)
    old.pop("names", None)
    (folder / "tpcli.json").write_text(json.dumps(old, indent=1) + "\n")
    gt, _ = paired(runs, gather_cmd, folder, work / "merged", env)
    (folder / "tpcli.json").write_text(json.dumps(doc, indent=1) + "\n")
    row(f"{label} cp -r of the tp=2 folder (median)", f"{cp['wall']:.2f} s", f"user {cp['user']:.1f} s, sys {cp['sys']:.1f} s")
    for what, fig in (("first run", g), ("repeat, layout cache on", gw), ("first run, manifest without names", gt)):
        path = _json_field(fig["out"], "path")
        row(f"{label} tpcli gather ({what}; path {path})",
            f"{fig['wall']:.2f} s (user {fig['user']:.1f}, sys {fig['sys']:.1f})",
            f"{fig['ratio']:.2f}x cp -r (median of {runs} pairs)", "<= 1.5x cp -r" if what == "first run" else "")
        row(f"{label}   each pair: ratio = tpcli / cp -r", pairs_text(fig))
    row(f"{label} tpcli gather peak RSS", f"{g['rss']:.2f} GB", "", rss_target)
    shutil.rmtree(work / "merged", ignore_errors=True)
    for flags, target in ((["--quick"], "<= 1 s"), ([], "<= 1 s + hashing")):
        runs_v = [measure([*tpcli_cmd, "verify", folder, *flags, "--json"], env) for _ in range(3)]
        row(f"{label} tpcli verify DIR {' '.join(flags)} (path {_json_field(runs_v[-1]['out'], 'path')})",
            f"{statistics.median(r['wall'] for r in runs_v):.2f} s (user "
            f"{statistics.median(r['user'] for r in runs_v):.2f}, sys {statistics.median(r['sys'] for r in runs_v):.2f})",
            "median of 3", target)


def inspect_rows(src: Path, work: Path, tpcli_cmd: list[str], env: dict, row) -> None:
    """inspect / static verify latency: without a cache entry (cold) and with one (warm), whole CLI."""
    cache_env = {**env, "TPCLI_CACHE_DIR": str(work / "result-cache")}
    for name, cmd in (("inspect --tp 2", ["inspect", src, "--tp", "2", "--json"]),
                      ("verify --tp 2 (static)", ["verify", src, "--tp", "2", "--json"])):
        cold = measure([*tpcli_cmd, *cmd], cache_env)["wall"]
        hits = statistics.median(measure([*tpcli_cmd, *cmd], cache_env)["wall"] for _ in range(3))
        row(f"tpcli {name}: cold (no cache entry)", f"{cold:.2f} s", "", "<= 3 s")
        row(f"tpcli {name}: warm (cache hit)", f"{hits:.2f} s", "", "<= 1 s")


def load_rows(label: str, src: Path, work: Path, tpcli_cmd: list[str], env: dict, row) -> None:
    """tpcli.load_model of tpcli's shards vs transformers' reload of its own DCP save, both under `tpcli run --cpu 2`."""
    save = measure([*tpcli_cmd, "run", "--cpu", "2", _script(work, "tf_save.py", TRANSFORMERS_SAVE), src,
                    work / "tf_dcp"], env)
    row(f"{label} transformers TP load + DCP save (2 ranks, whole)", f"{save['wall']:.2f} s")
    out_dir = work / "load"
    out_dir.mkdir()
    measure([*tpcli_cmd, "run", "--cpu", "2", _script(work, "load_worker.py", LOAD_WORKER), work / "tp2",
             work / "tf_dcp", out_dir], env)
    res = [json.loads((out_dir / f"load-{r}.json").read_text()) for r in range(2)]
    for mode in ("warm", "cold", "warm_fwd", "cold_fwd"):
        what = mode.replace("_fwd", ", ready + first forward")
        ours = max(r[f"tpcli_{mode}"] for r in res)
        theirs = max(r[f"transformers_{mode}"] for r in res)
        row(f"{label} load tp=2 ({what}): transformers reload of its DCP save", f"{theirs:.2f} s (slowest rank)")
        row(f"{label} load tp=2 ({what}): tpcli.load_model of tpcli shards", f"{ours:.2f} s (slowest rank)",
            f"{ours / theirs:.2f}x transformers", "<= 0.5x" if mode == "warm" else "")
    whole = folder_bytes(src)
    for r in res:
        row(f"{label} cold load + first forward, rank {r['rank']}: bytes read from storage",
            f"tpcli {r['tpcli_read'] / GB:.3f} GB, transformers {r['transformers_read'] / GB:.3f} GB",
            f"{r['tpcli_read'] / whole:.2f} / {r['transformers_read'] / whole:.2f} of the model", "~ 1/2")


def _json_field(out: str, key: str):
    try:
        return json.loads(out).get(key)
    except ValueError:
        return None


def _largest_tensor_bytes(folder: Path) -> int:
    from tpcli.formats.rankfile import read_header

    best = 0
    for f in folder.glob("*.safetensors"):
        header, _ = read_header(f)
        best = max(best, max(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values()))
    return best


def _script(work: Path, name: str, text: str) -> Path:
    path = work / name
    path.write_text(text)
    return path


if __name__ == "__main__":
    main()
