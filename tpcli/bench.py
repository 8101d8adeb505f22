"""`make bench`: speed and memory of shard, gather and load, side by side with the alternatives, in one run.

    python -m tpcli.bench [--root .cache/bench] [--sizes small,large] [--skip-load]

Builds random bf16 Llama checkpoints locally (3 safetensors files + index, cached in ROOT), warms the page cache,
then measures each contender in its own process (wall time, and peak RSS from `wait4`). Prints one table of
figures and ratios against the targets. Nothing here is a test: the numbers depend on the machine.
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

SIZES = {  # layers of a 2048-wide Llama (vocab 32000, GQA 16/8 heads): ~0.7 GB and ~1.4 GB in bf16
    "small": 5,
    "large": 12,
}
GB = 1e9


def build_bench_model(root: Path, layers: int) -> Path:
    """A random bf16 Llama written tensor by tensor (never the whole model in memory)."""
    out = root / f"llama-{layers}L"
    if (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from .plan import build_meta_model

    cfg = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                               num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                               tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    meta = build_meta_model(cfg).state_dict()
    tmp = root / f".tmp-{layers}L"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(t.numel() * 2 for t in meta.values())
    split = split_state_dict_into_shards_factory(meta, get_storage_size=lambda t: t.numel() * 2,
                                                 get_storage_id=lambda t: None, max_shard_size=total // 3 + 1,
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


def measure_isolated(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Like `measure`, but RSS of this command alone (RUSAGE_CHILDREN only grows, so measure in a fresh parent)."""
    code = ("import json, subprocess, sys, time, resource\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "w = time.perf_counter() - t\n"
            "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
            "print(json.dumps({'wall': w, 'rss': r, 'rc': p.returncode, 'out': p.stdout[-20000:], "
            "'err': p.stderr[-4000:]}))\n")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True, text=True)
    res = json.loads(proc.stdout)
    if res["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['out'][-2000:]}\n{res['err']}")
    return res["wall"], res["rss"] / GB, res["out"]


TRANSFORMERS_SAVE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto")
m.save_pretrained(sys.argv[2], distributed_checkpoint=True)
"""

CONSOLIDATE = """
import os, sys, time
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
t = time.perf_counter()
os.makedirs(sys.argv[2], exist_ok=True)
md = HuggingFaceStorageReader(sys.argv[1]).read_metadata()
consolidate_safetensors_files(input_dir=sys.argv[1], output_dir=sys.argv[2],
                              fqn_to_index_mapping=dict.fromkeys(md.state_dict_metadata, 1))
print(time.perf_counter() - t)
"""

ENGINE = """
import json, sys, time, tempfile, shutil
from tpcli.sharding import shard_checkpoint
from tpcli.gathering import gather_checkpoint
from tpcli.tiny import build_tiny
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
dist.init_process_group("gloo", timeout=timedelta(seconds=600))
from transformers import AutoModelForCausalLM
import tpcli
original, sharded, out = sys.argv[1:4]
rank = dist.get_rank()

def timed(fn):
    dist.barrier(); t = time.perf_counter(); m = fn(); dist.barrier(); dt = time.perf_counter() - t
    del m; gc.collect(); return dt

def read_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

def evict(folder):
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            fd = os.open(os.path.join(folder, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

res = {"rank": rank}
res["transformers_original"] = timed(lambda: AutoModelForCausalLM.from_pretrained(original, tp_plan="auto"))
res["transformers_shards"] = timed(lambda: AutoModelForCausalLM.from_pretrained(sharded, tp_plan="auto"))
res["tpcli_shards"] = timed(lambda: tpcli.load_model(sharded))
dist.barrier()
if rank == 0:
    evict(sharded)
dist.barrier()
before = read_bytes()
m = tpcli.load_model(sharded)
res["cold_read_bytes"] = read_bytes() - before
res["logical_bytes"] = m.tpcli_bytes_read
json.dump(res, open(os.path.join(out, f"load-{rank}.json"), "w"))
dist.barrier(); dist.destroy_process_group()
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tpcli.bench")
    parser.add_argument("--root", default=".cache/bench")
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = root / "work"
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    rows: list[tuple[str, str, str, str]] = []

    def row(metric, value, ratio="", target=""):
        rows.append((metric, value, ratio, target))
        print(f"  {metric}: {value} {ratio} {target}", file=sys.stderr, flush=True)

    # CLI start-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([py, "-m", "tpcli", "--help"], capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - t)
    row("tpcli --help", f"{statistics.median(times):.2f} s", "", "<= 0.4 s")

    sizes = [s for s in args.sizes.split(",") if s]
    for size in sizes:
        src = build_bench_model(root, SIZES[size])
        nbytes = folder_bytes(src)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        warm(src)
        label = f"{size} ({nbytes / GB:.2f} GB)"
        largest = _largest_tensor_bytes(src) / GB

        cp_wall, _, _ = measure_isolated(["cp", "-r", str(src), str(work / "copy")])
        row(f"{label} cp -r", f"{cp_wall:.2f} s")
        shutil.rmtree(work / "copy")

        wall, rss, out = measure_isolated([py, "-m", "tpcli", "shard", str(src), "--tp", "2", "--out",
                                           str(work / "tp2"), "--json"], env)
        _, _, out = measure_isolated([py, str(_script(work, "engine.py", ENGINE)), str(src), str(work)], env)
        engine = json.loads(out.strip().splitlines()[-1])
        for d in ("e-tp2", "e-merged"):
            shutil.rmtree(work / d, ignore_errors=True)
        row(f"{label} tpcli shard tp=2 (CLI, incl. ~5 s of imports)", f"{wall:.2f} s", f"{wall / cp_wall:.2f}x cp -r")
        row(f"{label} tpcli shard tp=2 (engine, imports done)", f"{engine['shard']:.2f} s",
            f"{engine['shard'] / cp_wall:.2f}x cp -r", "<= 3x cp -r")
        row(f"{label} tpcli shard peak RSS", f"{rss:.2f} GB", f"largest tensor {largest:.2f} GB",
            f"<= {0.6 + largest:.2f} GB")

        if size == sizes[-1]:
            tf_wall, tf_rss, _ = measure_isolated([py, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node=2", str(_script(work, "tf_save.py", TRANSFORMERS_SAVE)),
                                                   str(src), str(work / "tf_dcp")], env)
            row(f"{label} transformers TP load + DCP save (2 ranks)", f"{tf_wall:.2f} s",
                f"tpcli CLI/transformers = {wall / tf_wall:.2f}, engine {engine['shard'] / tf_wall:.2f}", "<= 0.3")
            shutil.rmtree(work / "tf_dcp", ignore_errors=True)

        warm(work / "tp2")
        g_wall, g_rss, _ = measure_isolated([py, "-m", "tpcli", "gather", str(work / "tp2"), "--out",
                                             str(work / "merged"), "--json"], env)
        c_wall, c_rss, c_out = measure_isolated([py, str(_script(work, "consolidate.py", CONSOLIDATE)),
                                                 str(work / "tp2"), str(work / "consolidated")], env)
        c_engine = float(c_out.strip().splitlines()[-1])
        cp2_wall, _, _ = measure_isolated(["cp", "-r", str(work / "tp2"), str(work / "copy2")])
        row(f"{label} tpcli gather (CLI)", f"{g_wall:.2f} s", f"{g_wall / cp2_wall:.2f}x cp -r, "
            f"{g_wall / c_wall:.2f}x torch consolidate ({c_wall:.2f} s, RSS {c_rss:.2f} GB)",
            "<= 1x consolidate")
        row(f"{label} tpcli gather (engine, imports done)", f"{engine['gather']:.2f} s",
            f"{engine['gather'] / cp2_wall:.2f}x cp -r, {engine['gather'] / c_engine:.2f}x torch consolidate "
            f"engine ({c_engine:.2f} s)", "<= 3x cp -r, <= 1x consolidate")
        row(f"{label} tpcli gather peak RSS", f"{g_rss:.2f} GB", "", f"<= {0.6 + largest:.2f} GB")
        for d in ("merged", "consolidated", "copy2"):
            shutil.rmtree(work / d, ignore_errors=True)

        if size == sizes[-1] and not args.skip_load:
            out_dir = work / "load"
            out_dir.mkdir()
            measure_isolated([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              str(_script(work, "load_worker.py", LOAD_WORKER)), str(src), str(work / "tp2"),
                              str(out_dir)], env)
            res = [json.loads((out_dir / f"load-{r}.json").read_text()) for r in range(2)]
            t_orig = max(r["transformers_original"] for r in res)
            t_shards = max(r["transformers_shards"] for r in res)
            t_ours = max(r["tpcli_shards"] for r in res)
            row(f"{label} load tp=2: transformers from original", f"{t_orig:.2f} s")
            row(f"{label} load tp=2: transformers reload of the shards", f"{t_shards:.2f} s")
            row(f"{label} load tp=2: tpcli.load_model", f"{t_ours:.2f} s",
                f"{t_ours / t_orig:.2f}x original, {t_ours / t_shards:.2f}x shards", "<= 0.5x both")
            shard_total = folder_bytes(work / "tp2") - (work / "tp2" / "tpcli.json").stat().st_size
            for r in res:
                row(f"{label} cold load rank {r['rank']}: bytes from storage",
                    f"{r['cold_read_bytes'] / GB:.3f} GB (logical {r['logical_bytes'] / GB:.3f} GB)",
                    f"{r['cold_read_bytes'] / shard_total:.2f} of the model", "~ 1/2")
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'metric':58} | {'value':34} | {'ratio':48} | target")
    print("-" * 160)
    for metric, value, ratio, target in rows:
        print(f"{metric:58} | {value:34} | {ratio:48} | {target}")


def _largest_tensor_bytes(folder: Path) -> int:
    from .storage import read_header

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
