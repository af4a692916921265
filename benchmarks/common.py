"""Helpers shared by the benchmark scripts: device name, interleaved timing, activation memory, sizes.

Import it first: run as a script, the benchmarks folder leads sys.path and its kernels.py would
shadow the hub package "kernels" that transformers probes for at import, so importing this module
takes the folder off sys.path again (this module is loaded by then).
"""

import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402


def sibling(name: str):
    """Another benchmark script as a module, to reuse its functions (this folder is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the thread count torch uses (as ``dlo report`` records them)."""
    from dlo.report import device_info

    info = device_info(device)
    return info["name"] if device.type == "cuda" else f"{info['name']} ({info['threads']} threads)"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    from dlo import ops

    return dict(device=device_name(device), threads=torch.get_num_threads(), dtype=str(dtype).removeprefix("torch."),
                backend=ops.kernel_backend(torch.empty(0, device=device, dtype=dtype)), torch=torch.__version__,
                transformers=transformers.__version__, date=datetime.date.today().isoformat(),
                command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))


def add_size_args(p, *, cpu: dict, cuda: dict):
    """Integer flags (sizes, repeats) whose defaults depend on the device; resolve_sizes fills them in."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: fp32 on CPU, bf16 on CUDA")
    for name in cpu:
        p.add_argument(f"--{name.replace('_', '-')}", type=int,
                       help=f"default: {cpu[name]} on CPU, {cuda[name]} on CUDA")
    p.add_argument("--d-ff", type=int, help="MLP width; default Llama's 256-rounded 8d/3")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one timed round: a smoke run")
    p.add_argument("--seed", type=int, default=0)


def resolve_sizes(args, *, cpu: dict, cuda: dict, quick: dict):
    """Fill unset size flags from the device's defaults (or the --quick ones); returns (device, dtype)."""
    device = torch.device(args.device)
    defaults = quick if args.quick else (cuda if device.type == "cuda" else cpu)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.d_ff is None:
        args.d_ff = 256 * math.ceil(8 * args.d / 3 / 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return device, dtype


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Seconds of each fn() per round, {name: [s, ...]}. The candidates take turns in every round, so
    load changes on a shared machine hit them alike and per-round ratios stay meaningful."""
    samples = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return samples


def summarize(samples: list, base: list) -> dict:
    """Median time and its spread, and the median of per-round ratios to ``base`` with their spread."""
    ratios = [s / b for s, b in zip(samples, base)]
    return dict(ms=1e3 * statistics.median(samples), ms_min=1e3 * min(samples), ms_max=1e3 * max(samples),
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                samples_ms=[1e3 * s for s in samples])


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs: the activation memory
    a training step holds between forward and backward (deterministic, unlike CPU allocator peaks).
    Storages of ``exclude`` (parameters, the input) are held anyway and not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn, device: torch.device) -> int | None:
    """CUDA peak bytes allocated during fn() beyond what was allocated before (None on CPU: no such counter)."""
    if device.type != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def write_json(result: dict, path: str):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def fmt_ratio(r: dict) -> str:
    return f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
