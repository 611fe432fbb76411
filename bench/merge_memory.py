"""Merge memory: two ~1B- (or ~7B-) parameter Mistral-shaped models (random bf16 weights, safetensors on disk)
merged with the merge stage's own code (tasks.models.merge.run_merge, mergekit, SLERP t=0.5), in a child process whose peak
resident memory and wall time are reported against one model's size on disk.

Two peaks: ru_maxrss (VmHWM: all resident pages, including the clean file-backed pages of the memory-mapped input
safetensors, which the kernel can drop and re-read at will) and the peak of RssAnon (anonymous memory: tensors,
Python heap; what the merge really needs), sampled from /proc/<pid>/status every 50 ms. The inputs' page cache is
dropped (posix_fadvise DONTNEED) before the merge, so the child reads them cold.

--limit-x X runs the child in its own memory cgroup limited to X times one model's size on disk, swap off (cgroup
v2 memory.max + memory.swap.max, else cgroup v1 memory.limit_in_bytes + memory.memsw.limit_in_bytes): the kernel
reclaims page cache under that limit and OOM-kills the child if the merge does not fit; prints whether it completed.
--limit-gb G is the same with an absolute limit of G GiB.

--shape 7b (the Mistral-7B shape, 14.5 GB per model) writes the random weights straight to safetensors, one shard per
decoder layer, instead of building the model in memory (slow, ~15 GB of RAM); --quick --shape 7b runs that writer
on the tiny shape. The models (29 GB at 7B) are deleted at the end unless --keep names a folder for them.

python bench/merge_memory.py [--quick] [--shape 1b|7b] [--keep DIR] [--limit-x 1.5 | --limit-gb 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import MistralConfig

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ~1.1B parameters (the TinyLlama 1.1B shape, Mistral architecture): 2.2 GB in bf16.
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
# ~7.24B parameters (the Mistral-7B shape): 14.5 GB in bf16.
SEVEN_B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
SHAPES = {"1b": ONE_B, "7b": SEVEN_B}
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def make(folder: Path, shape: dict, seed: int) -> int:
    """Save a random bf16 Mistral of `shape` (safetensors) with the zoo tokenizer; return its parameter count."""
    import torch
    from transformers import MistralForCausalLM

    from tasks.demo.zoo import build_tokenizer

    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    model = MistralForCausalLM(mistral_config(shape))
    model.save_pretrained(str(folder), safe_serialization=True)
    build_tokenizer().save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def mistral_config(shape: dict) -> MistralConfig:
    """The MistralConfig that make() and write_shards() save (architectures set: mergekit picks the layout by it)."""
    from transformers import MistralConfig

    cfg = MistralConfig(**shape, sliding_window=None, tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["MistralForCausalLM"]
    return cfg


def shard_layout(shape: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """MistralForCausalLM's parameter names and shapes per shard: embeddings, each decoder layer, norm + head."""
    h, v, i = shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])

    def layer(n: int) -> list[tuple[str, tuple[int, ...]]]:
        p = f"model.layers.{n}."
        return [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]

    return [[("model.embed_tokens.weight", (v, h))], *(layer(n) for n in range(shape["num_hidden_layers"])),
            [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]]


def write_shards(folder: Path, shape: dict, seed: int) -> int:
    """Write a random bf16 Mistral of `shape` shard by shard (peak RAM ~one layer); return its parameter count."""
    import torch
    from safetensors.torch import save_file

    from tasks.demo.zoo import build_tokenizer

    gen = torch.Generator().manual_seed(seed)
    layout = shard_layout(shape)
    weight_map: dict[str, str] = {}
    params = 0
    for k, names in enumerate(layout, 1):
        file = f"model-{k:05d}-of-{len(layout):05d}.safetensors"
        # the values of MistralForCausalLM's init: N(0, 0.02) matrices, RMSNorm weights of one
        shard = {n: torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else
                 torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) for n, s in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        params += sum(t.numel() for t in shard.values())
        weight_map |= dict.fromkeys(shard, file)
        del shard
    index = {"metadata": {"total_size": params * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    mistral_config(shape).save_pretrained(str(folder))
    build_tokenizer().save_pretrained(str(folder))
    return params


def child_make(folder: str, shape: str, seed: str, sharded: str) -> None:
    writer = write_shards if sharded == "1" else make
    print(json.dumps({"params": writer(Path(folder), json.loads(shape), int(seed))}))


def child_merge(a: str, b: str, out: str) -> None:
    """The measured process: import, merge, report own peak RSS and the merge's wall time."""
    from tasks.config.schema import Merge
    from tasks.models.merge import run_merge

    override = json.loads(os.environ.get("BENCH_MERGE_OPTIONS", "{}"))
    if override:  # try mergekit options the stage does not set yet (reported as such)
        import mergekit.options

        cls = mergekit.options.MergeOptions
        init = cls.__init__

        def patched(self, **kw):
            init(self, **(kw | override))

        cls.__init__ = patched
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    merge = Merge(name="bench-slerp", recipe={"merge_method": "slerp", "base_model": "a",
                                              "models": [{"model": "a"}, {"model": "b"}],
                                              "parameters": {"t": 0.5}, "dtype": "bfloat16"})
    t0 = time.perf_counter()
    run_merge(merge, {"a": a, "b": b}, Path(out))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_merge_mb": base_rss}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...), in bytes; {} once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if rest.strip().endswith(" kB"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def drop_page_cache(folder: Path) -> None:
    """Evict the clean page cache of a model's files (so the merge reads them cold, charged to its own cgroup)."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # DONTNEED skips dirty pages: the freshly written models must reach the disk first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit and no swap (v2 if its memory controller is on, else v1)."""

    def __init__(self, limit: int):
        self.limit, self.path, self.version = limit, None, None
        name = f"bench-merge-{os.getpid()}"
        v2 = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/memory")
        try:
            if "memory" in (v2 / "cgroup.controllers").read_text().split():
                self.path, self.version = v2 / name, 2
        except OSError:
            pass
        if self.path is None and (v1 / "memory.limit_in_bytes").exists():
            self.path, self.version = v1 / name, 1
        if self.path is None:
            raise OSError("no cgroup v2 memory controller at /sys/fs/cgroup, no cgroup v1 one at /sys/fs/cgroup/memory")
        self.path.mkdir()
        try:
            if self.version == 2:
                (self.path / "memory.max").write_text(str(limit))
                (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                if (self.path / "memory.memsw.limit_in_bytes").exists():
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            self.remove()
            raise

    @property
    def knob(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes (cgroup v1)"

    def enter(self) -> None:
        """Move the calling process into the cgroup (run in the child before exec)."""
        (self.path / "cgroup.procs").write_text("0")

    def peak(self) -> int | None:
        """The cgroup's peak charge (anonymous + page cache), bytes."""
        f = self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        try:
            return int(f.read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        f = self.path / ("memory.events" if self.version == 2 else "memory.oom_control")
        try:
            for line in f.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def run_merge_child(a: Path, b: Path, out: Path, cgroup: MemoryCgroup | None) -> dict:
    """Run the measured merge child, sampling its /proc status every 50 ms; its report plus the sampled peaks."""
    proc = subprocess.Popen([sys.executable, __file__, "--merge", str(a), str(b), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=cgroup.enter if cgroup else None)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "VmHWM": 0}
    while proc.poll() is None:
        st = proc_status(proc.pid)
        for k in peak:
            peak[k] = max(peak[k], st.get(k, 0))
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    rep = {"returncode": proc.returncode, "stderr": stderr}
    if proc.returncode == 0:
        rep |= json.loads(stdout.strip().splitlines()[-1])
    rep |= {f"sampled_{k}": v for k, v in peak.items()}
    return rep


def size_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    from bench._machine import header, table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape, written by the --shape's writer (for the test)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b",
                    help="1b: TinyLlama 1.1B shape, built in memory; 7b: Mistral-7B shape, written shard by shard")
    ap.add_argument("--keep", default=None, help="folder for the models (reused if already there; else deleted)")
    limit = ap.add_mutually_exclusive_group()
    limit.add_argument("--limit-x", type=float, default=None,
                       help="run the merge in a memory cgroup limited to this many times one model's size on disk")
    limit.add_argument("--limit-gb", type=float, default=None,
                       help="run the merge in a memory cgroup limited to this many GiB")
    a = ap.parse_args()
    shape = TINY if a.quick else SHAPES[a.shape]
    sharded = a.shape == "7b"
    with tempfile.TemporaryDirectory(dir=a.keep and None) as tmp:
        root = Path(a.keep or tmp)
        dirs = {name: root / name for name in ("a", "b")}
        t0 = time.perf_counter()
        params = 0
        for seed, (name, d) in enumerate(dirs.items()):
            if not list(d.glob("*.safetensors")):
                d.mkdir(parents=True, exist_ok=True)
                params = run_child("--make", str(d), json.dumps(shape), str(seed), "1" if sharded else "0")["params"]
        made = time.perf_counter() - t0
        out = root / "merged"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        one = size_on_disk(dirs["a"])
        for d in dirs.values():
            drop_page_cache(d)
        limit_bytes = int(a.limit_gb * 2**30) if a.limit_gb else int(a.limit_x * one) if a.limit_x else None
        limit_name = f"{a.limit_gb:g} GiB" if a.limit_gb else f"{a.limit_x:g}x"
        cgroup, cgroup_error = None, None
        if limit_bytes:
            try:
                cgroup = MemoryCgroup(limit_bytes)
            except OSError as e:
                cgroup_error = str(e)
        try:
            m = run_merge_child(dirs["a"], dirs["b"], out, cgroup)
            cg_peak, cg_ooms = (cgroup.peak(), cgroup.oom_kills()) if cgroup else (None, None)
        finally:
            if cgroup:
                cgroup.remove()
        if m["returncode"] != 0 and not cgroup:
            raise SystemExit(f"merge child failed ({m['returncode']}):\n{m['stderr'][-3000:]}")
        merged = size_on_disk(out) if m["returncode"] == 0 else 0
    mb = lambda x: f"{x / 2**20:,.0f} MB"  # noqa: E731
    anon = m["sampled_RssAnon"]
    writer = ("written shard by shard, one safetensors file per decoder layer" if sharded
              else "saved by MistralForCausalLM.save_pretrained")
    print(f"Merge memory: SLERP of two random bf16 Mistral-shaped models {shape} "
          f"({params / 1e9:.2f}e9 params each{'' if params else ', made earlier'}; {writer}; made in {made:.0f} s) "
          f"with "
          f"tasks.models.merge.run_merge (mergekit, lazy loading), inputs' page cache dropped first. "
          f"peak RSS = the merge child's own ru_maxrss (VmHWM: anonymous + file-backed pages, so it includes the "
          f"mmap'd input safetensors' clean page cache, which the kernel can reclaim); peak anon RSS = the largest "
          f"RssAnon in /proc/<pid>/status sampled every 50 ms (tensors and heap: memory that cannot be reclaimed "
          f"without swap; largest sampled RssFile {mb(m['sampled_RssFile'])}). Both include the Python/torch/mergekit "
          f"imports" + (f" ({m['rss_before_merge_mb']:.0f} MB ru_maxrss before the merge began)" if m["returncode"] == 0 else "")
          + (f"; mergekit options overridden: {os.environ['BENCH_MERGE_OPTIONS']}" if os.environ.get("BENCH_MERGE_OPTIONS") else ""))
    print(header())
    # the targets: a 1B merge below 1.5x one model's size, a 7B merge inside a 16 GB machine
    target = 1.5 * one if a.shape == "1b" else 16 * 2**30
    target_name = "< 1.5x" if a.shape == "1b" else f"< 16 GiB = {target / one:.2f}x"
    if m["returncode"] == 0:
        ratio, aratio = m["peak_rss_mb"] * 2**20 / one, anon / one
        judge = lambda r: "n/a (tiny shape)" if a.quick else "yes" if r * one < target else "NO"  # noqa: E731
        print(table([{
            "one model on disk": mb(one), "merged on disk": mb(merged), "merge wall time": f"{m['seconds']:.1f} s",
            "peak RSS (ru_maxrss)": f"{m['peak_rss_mb']:,.0f} MB = {ratio:.2f}x",
            "peak anon RSS (sampled)": f"{mb(anon)} = {aratio:.2f}x", "target": target_name,
            "met (ru_maxrss)": judge(ratio), "met (anon)": judge(aratio),
        }], ["one model on disk", "merged on disk", "merge wall time", "peak RSS (ru_maxrss)",
             "peak anon RSS (sampled)", "target", "met (ru_maxrss)", "met (anon)"]))
    else:
        hwm = m["sampled_VmHWM"]
        print(f"merge child exited with {m['returncode']} (one model on disk {mb(one)}; largest sampled RssAnon "
              f"{mb(anon)} = {anon / one:.2f}x, VmHWM {mb(hwm)} = {hwm / one:.2f}x)\n{m['stderr'][-1500:]}")
    if limit_bytes:
        if cgroup is None:
            print(f"completed under a {limit_name} memory.max: n/a (no writable memory cgroup: {cgroup_error})")
        else:
            ok = m["returncode"] == 0
            peak = f"{mb(cg_peak)} = {cg_peak / one:.2f}x" if cg_peak is not None else "n/a"
            print(f"completed under a {limit_name} memory.max: {'yes' if ok else 'no'} "
                  f"({cgroup.knob} = {mb(cgroup.limit)}, swap 0; cgroup peak charge incl. page cache "
                  f"{peak}; OOM kills: {cg_ooms}" + ("" if ok else f"; child exit {m['returncode']}") + ")")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--make":
        child_make(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--merge":
        child_merge(*sys.argv[2:5])
    else:
        main()
