"""Training-throughput benchmark: the upstream DERM model and the downstream CTR model, each on
TorchRec (DMP, fused row-wise Adagrad) next to a plain-PyTorch baseline of the same model and, for
the speed-up, next to the reference path of 2026-11-29; on 1 and 2 CPU ranks (gloo).

Paths (all train the same model on the same batches, stepped in turns):

- ``torchrec`` (the default path): ``build_derm`` / ``build_downstream`` with tables on ``meta`` +
  ``sharding.dmp.shard_model``: the planner shards the tables over the ranks, FBGEMM's fused
  row-wise Adagrad updates them inside the backward pass, the dense parts are data-parallel (DDP
  inside DMP) under fused Adam; attention through ``modules/attention.py`` (one linear, SDPA;
  the sequence encoders' last layer computes the summary token only), the contrastive loss scored
  on positive rows, mixed precision ``auto`` (bf16 on a CPU with AVX512-BF16 or AMX).
- ``baseline``: the same model and dense settings, its ``ebc``/``ec`` replaced by
  ``bench/plain_embeddings.py`` (``nn.EmbeddingBag(sparse=True)`` / ``nn.Embedding(sparse=True)``,
  same table configs, same outputs), tables updated by ``torch.optim.Adagrad`` on their sparse
  gradients (the nearest plain optimizer to row-wise Adagrad: it keeps one accumulator per
  *element*, not per row); on 2 ranks the whole model is replicated and wrapped in DDP, which
  all-reduces the dense gradients and, with gloo, the sparse ones (as sparse tensors).
  ``TR/base`` compares the two embedding stacks under one dense part.
- ``reference``: the default path as it was before issue 13 (2026-11-29), the same code switched
  back: float32, ``nn.MultiheadAttention``'s own function for every attention
  (``modules.attention.set_attention(model, "reference")``, every token of every layer), the
  contrastive loss over the whole [B, B] matrix, the dense optimizer's per-parameter loop. Run
  for the configs whose dense part is the question (default, ctr); ``vs ref`` is each path's
  speed-up over it, a ratio within one run.

Model configs (``--configs``):

- ``default``: ``DERMConfig()`` (token_dim 32, two DHEN layers per tower) on the world's own spec
  (12 pooled tables of 3-22,400 rows, widths 4-16; one sequence table of 6,500 x 16).
- ``heavy``: embedding-heavy. The spec's ``user_id`` table grows to 2,000,000 x 128, ``pin_id`` and
  the ``seq_pin`` sequence table to 1,000,000 x 128, and four pooled id-list features are added
  (``user_seq_bag_0..3``: each the ``seq_pin_ids`` column, mean-pooled, ~25 ids a row, its own
  250,000 x 128 table; a stand-in for the several engaged-Pin lists per action and window a real log
  has, which the synthetic world does not generate). A row then looks up ~127 rows of width 128
  (2 single ids, 4 x ~25 pooled, ~25 unpooled) against ~30 rows of width 4-16 in ``default``. The
  dense part is lighter: token_dim 16, one DHEN layer (mlp + mlp, hidden 64) per tower, heads (16,);
  the sequence encoder (1 transformer layer) stays. The world holds 20,000 users and 5,000 Pins, so
  a batch touches at most those rows of the big tables: table size shows in memory and optimizer
  state, ids per row in the lookup work.
- ``ctr``: the downstream CTR model (``modules/downstream.py``: MMoE of DCNv2 experts, a sequence
  encoder) on the downstream feature set of configs/pipeline-demo.toml with four 64-wide DERM
  embeddings projected to 16 each (random unit vectors, 3 % missing: the feature-store join is
  not what is measured), as the daily pipeline trains it.

Work and ceilings. Each rank counts the FLOPs of one training step of its path with
``torch.utils.flop_counter.FlopCounterMode`` plus the attention products by hand (4·B·H·N·L·d
forward, 3x that forward and backward: the CPU SDPA kernels are invisible to the counter);
``MFLOP/ex`` is that over the batch, ``GFLOP/s`` that over the median step time (all ranks). The
run first measures this machine's GEMM ceilings itself — the best of float32 and bfloat16
``torch.mm`` rates over a few shapes, with one thread and with all — and ``%fp32`` / ``%bf16`` are
a path's GFLOP/s over the ceilings at its thread count.

Method. Every rank is its own process (peak RSS from ``os.wait4``; the table shows the largest
rank's). Each rank first loads ``--warmup + --steps`` batches of ``--batch-size`` rows (its shard of
the stream) into memory, so the loader is not measured. The paths of a configuration are built
side by side and then stepped in turns (one step of each, ...; the idle ones wait on a pipe), so
they share the machine's conditions. Warm-up steps are dropped. The machine is shared, so
a measured step counts only if the rest of the machine used at most 10 % of its CPU meanwhile
(``/proc/stat`` minus our processes' ticks); after a disturbed step the next one waits for a quiet
machine (at most ``--max-wait`` s per configuration), and steps go on until each path has
``--steps`` quiet ones (at most three times that many steps; with fewer than half of ``--steps``
quiet ones a path's median is over all its steps, marked ``noisy``). examples/s = ranks x batch /
the median step time (a step's time is its slowest rank's). The embedding/dense split comes from
timed hooks, not the profiler: embedding = the collections' forward (pre-hook to hook, waiting
there for a sharded module's output all-to-all) + the backward from the first gradient reaching a
collection's output to the end of ``loss.backward()`` (the lookups' backward, TorchRec's fused
update, the gradient all-to-alls, and DDP's final wait for its all-reduces) + the baseline's sparse
Adagrad step; dense = the rest (dense forward and backward, loss, Adam). Threads: the trainer's
policy (``sharding.distributed.set_threads``): all cores for 1 rank, one per rank for 2.

The run ends with ``speed-up vs reference: N.NNx``, the reference's median step time over the
default path's, for the first configuration and rank count that has a reference (default, 1 rank
with the defaults).

Usage::

    python bench/bench_train.py                                  # generates `small`; ~10 min on a quiet machine
    python bench/bench_train.py --data runs/data/small           # reuse a generated small world
    python bench/bench_train.py --configs default --ranks 1      # the speed-up line alone, ~2 min
    python bench/bench_train.py --configs default --ranks 1 --steps 3 --warmup 1 --batch-size 256  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "ctr"
HEAVY_DIM = 128
HEAVY_ROWS = {"user_id": 2_000_000, "pin_id": 1_000_000, "seq_pin": 1_000_000}
"""Rows of the embedding-heavy config's grown tables (``seq_pin`` is the sequence table)."""
HEAVY_BAGS = 4
"""Pooled id-list features over the sequence column that the embedding-heavy config adds."""
HEAVY_BAG_ROWS = 250_000
CONFIGS = ("default", "heavy", "ctr")
REFERENCE_CONFIGS = ("default", "ctr")
"""Configs whose question is the dense step, run with the reference path too (``heavy``'s is the
embedding stack; three of its paths would not fit 2 ranks in 24 GB)."""
DERM_FEATURES = ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")
DERM_DIM, DERM_PROJECTION = 64, 16
QUIET_SHARE = 0.1
"""A measured step counts if the rest of the machine used at most this share of its CPU meanwhile."""
MAX_TRIES = 3
"""Measured steps per path stop at this multiple of ``--steps``, quiet or not."""
SPARSE_LR = 0.05  # OptimizerConfig's defaults, used by every path
DENSE_LR = 1e-3
GEMM_SHAPES = ((2048, 256, 256), (2048, 512, 512), (4096, 1024, 1024))
"""(M, K, N) of the ``torch.mm`` calls whose best rate is the machine's GEMM ceiling."""


# ---- model configs (built inside the rank processes) ----------------------------------------------
def _model_config(name: str):
    from modules.config import DERMConfig, DHENConfig

    if name == "default":
        return DERMConfig()
    light = DHENConfig(layers=(("mlp", "mlp"),), mlp_hidden=64)
    return DERMConfig(
        token_dim=16, user_dhen=light, pin_dhen=light, interaction_dhen=dataclasses.replace(light, out_tokens=2), head_hidden=(16,)
    )


def _spec(name: str, data: str):
    """The world's spec, or its embedding-heavy variant (see the module docstring)."""
    from data.spec import SparseFeature, load_spec

    spec = load_spec(Path(data) / "spec.toml")
    if name != "heavy":
        return spec
    grow = lambda f, rows: dataclasses.replace(f, num_embeddings=rows, embedding_dim=HEAVY_DIM)  # noqa: E731
    sparse = [grow(f, HEAVY_ROWS[f.name]) if f.name in HEAVY_ROWS else f for f in spec.sparse]
    seq = next(f for f in spec.sequence if f.table == "seq_pin")
    sparse += [
        SparseFeature(
            name=f"user_seq_bag_{i}", tower="user", num_embeddings=HEAVY_BAG_ROWS, embedding_dim=HEAVY_DIM,
            column=seq.column, multi=True, pooling="mean", sources=seq.sources,
        )
        for i in range(HEAVY_BAGS)
    ]
    sequence = [grow(f, HEAVY_ROWS["seq_pin"]) if f.table == "seq_pin" else f for f in spec.sequence]
    return dataclasses.replace(spec, sparse=tuple(sparse), sequence=tuple(sequence))


def _build_task(config: str, spec, gather):
    """The unsharded train task of ``config`` (tables on ``meta``, dense parts on the CPU)."""
    import torch

    from modules.derm import build_derm
    from modules.downstream import build_downstream
    from modules.downstream_config import DERMFeature, DownstreamConfig

    cpu, meta = torch.device("cpu"), torch.device("meta")
    if config != "ctr":
        return build_derm(spec, SOURCE, _model_config(config), device=cpu, embedding_device=meta, gather=gather)
    features = tuple(tomllib.loads((ROOT / "configs" / "pipeline-demo.toml").read_text())["downstream_features"])
    derm = tuple(DERMFeature(n, DERM_DIM, DERM_PROJECTION) for n in DERM_FEATURES)
    return build_downstream(spec, SOURCE, DownstreamConfig(features=features, derm=derm), kind="ctr", device=cpu, embedding_device=meta)


def _add_derm(batch, config: str, seed: int):
    """The downstream model's DERM inputs: random unit vectors, 3 % of rows missing."""
    import torch

    from modules.downstream_config import missing_key

    if config == "ctr":
        g = torch.Generator().manual_seed(seed)
        for name in DERM_FEATURES:
            batch.derm[name] = torch.nn.functional.normalize(torch.randn(batch.batch_size, DERM_DIM, generator=g), dim=1)
            batch.derm[missing_key(name)] = (torch.rand(batch.batch_size, 1, generator=g) < 0.03).float()
    return batch


def _as_reference(task) -> None:
    """Switches ``task`` back to the path of 2026-11-29 (see the module docstring; float32 and the
    per-parameter optimizer are set by the caller)."""
    from modules.attention import set_attention

    set_attention(task, "reference")  # also: every token through the sequence encoders' last layer
    contrastive = getattr(getattr(task, "loss", None), "contrastive", None)
    if contrastive is not None:
        contrastive.score_all_rows = True


# ---- timing hooks and work ----------------------------------------------------------------------
class EmbeddingTimer:
    """Times the embedding collections inside a step with module and tensor hooks (see the module
    docstring for what counts as embedding time)."""

    def __init__(self, modules) -> None:
        self.forward = 0.0
        self.first_grad: float | None = None
        self._start = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._before)
            m.register_forward_hook(self._after)

    def reset(self) -> None:
        self.forward, self.first_grad = 0.0, None

    def _before(self, module, args) -> None:
        self._start = time.perf_counter()

    def _after(self, module, args, out):
        from torchrec.distributed.types import LazyAwaitable
        from torchrec.sparse.jagged_tensor import KeyedTensor

        if isinstance(out, LazyAwaitable):  # a sharded module: wait for its output all-to-all here
            out = out.wait()
        self.forward += time.perf_counter() - self._start
        tensors = [out.values()] if isinstance(out, KeyedTensor) else [jt.values() for jt in out.values()]
        for t in tensors:
            if t.requires_grad:
                t.register_hook(self._grad)
        return out

    def _grad(self, grad) -> None:
        if self.first_grad is None:
            self.first_grad = time.perf_counter()


def _count_flops(model, step) -> float:
    """FLOPs of one ``step()`` of ``model`` (forward and backward): what ``FlopCounterMode`` counts,
    plus the attention products it cannot see (``modules.attention.attention_flops``, x3)."""
    from torch.utils.flop_counter import FlopCounterMode

    from modules.attention import SelfAttention, attention_flops

    calls = []

    def hook(module, args, out):
        B, L, N = args[0].shape[0], args[0].shape[1], out.shape[1]  # N queries attend to L tokens
        calls.append(attention_flops(B, module.num_heads, N, L, module.dim // module.num_heads))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SelfAttention)]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            step()
    finally:
        for h in handles:
            h.remove()
    counted = [str(op) for op in counter.get_flop_counts().get("Global", {})]
    by_hand = 0 if any("scaled_dot_product" in op for op in counted) else 3 * sum(calls)
    return float(counter.get_total_flops() + by_hand)


# ---- one rank of one path ----------------------------------------------------------------------
def _build(job: dict):
    """This rank's model, optimizers and in-memory batches for ``job``; -> (step function, info)."""
    import itertools

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.plain_embeddings import PlainEmbeddingBagCollection, PlainEmbeddingCollection
    from data.loader import make_loader
    from sharding.collectives import all_gather_ids
    from sharding.config import OptimizerConfig
    from sharding.distributed import set_threads
    from sharding.dmp import shard_model

    world, rank, path, config = job["world"], job["rank"], job["path"], job["config"]
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    set_threads()  # the trainer's policy: cores // ranks
    torch.manual_seed(0)
    # shard_model needs a group, also for 1 rank; the ranks meet through a file store (no port to race for)
    dist.init_process_group("gloo", init_method=f"file://{job['store']}", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    spec = _spec(config, job["data"])
    loader = make_loader(job["data"], SOURCE, batch_size=job["batch"], rank=rank, world_size=world, spec=spec)
    batches = [_add_derm(b, config, i) for i, b in enumerate(itertools.islice(loader, job["batches"]))]  # in memory first
    if len(batches) < job["batches"]:
        raise SystemExit(f"the data holds only {len(batches)} batches of {job['batch']} per rank")

    gather = all_gather_ids() if world > 1 else None
    task = _build_task(config, spec, gather)
    reference = path == "reference"
    if reference:
        _as_reference(task)
    task.set_mixed_precision("none" if reference else "auto", "cpu")
    plan = {}
    if path in ("torchrec", "reference"):
        model, optimizer = shard_model(task, cpu, OptimizerConfig(sparse_lr=SPARSE_LR, dense_lr=DENSE_LR, fused_dense=not reference))
        collections = [c for c in (model.module.model.ebc, model.module.model.ec) if c is not None]
        plan = {t: p.sharding_type for tables in model.plan.plan.values() for t, p in tables.items()}
        sparse_opt, dense_opt = None, optimizer  # the tables' update is fused into the backward pass
    else:
        inner = task.model
        inner.ebc = PlainEmbeddingBagCollection(inner.ebc.embedding_bag_configs(), device=cpu) if inner.ebc is not None else None
        inner.ec = PlainEmbeddingCollection(inner.ec.embedding_configs(), device=cpu) if inner.ec is not None else None
        collections = [c for c in (inner.ebc, inner.ec) if c is not None]
        tables = {id(p) for m in collections for p in m.parameters()}
        sparse_opt = torch.optim.Adagrad([p for m in collections for p in m.parameters()], lr=SPARSE_LR)
        dense_opt = torch.optim.Adam([p for p in task.parameters() if id(p) not in tables], lr=DENSE_LR, fused=True)
        # As DMP wraps its dense part: no buffer broadcast (the estimator is kept equal by gathering ids).
        model = DistributedDataParallel(task, broadcast_buffers=False, gradient_as_bucket_view=True) if world > 1 else task
    optimizers = [o for o in (sparse_opt, dense_opt) if o is not None]
    timer = EmbeddingTimer(collections)
    batch_cycle = itertools.cycle(batches)

    def step() -> dict:
        batch = next(batch_cycle)
        t0 = time.perf_counter()
        timer.reset()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss, _ = model(batch)
        loss.backward()
        t1 = time.perf_counter()
        sparse_step = 0.0
        if sparse_opt is not None:
            sparse_opt.step()
            sparse_step = time.perf_counter() - t1
        dense_opt.step()
        t2 = time.perf_counter()
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {loss.item()}")
        return {"step": t2 - t0, "embedding": timer.forward + (t1 - timer.first_grad) + sparse_step}

    flops = _count_flops(task, step)  # one step, not measured: the first warm-up
    info = {"threads": torch.get_num_threads(), "plan": plan, "flops": flops,
            "precision": "bf16" if task.autocast_dtype is not None else "fp32"}
    return step, info


def _gemm_ceilings(threads: int) -> dict[str, float]:
    """This machine's best ``torch.mm`` rate in GFLOP/s over ``GEMM_SHAPES``, float32 and bfloat16,
    on ``threads`` threads (a process of its own, so that the thread count is its alone)."""
    import torch

    torch.set_num_threads(threads)
    best = {"float32": 0.0, "bfloat16": 0.0}
    for dtype in best:
        for m, k, n in GEMM_SHAPES:
            a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
            for _ in range(3):
                torch.mm(a, b)
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t0)
            best[dtype] = max(best[dtype], 2 * m * k * n / min(times) / 1e9)
    return best


def _child(job: dict) -> None:
    """A rank process. Talks to the parent in lines: ``ready {info}`` once built, then for each
    ``go`` it reads, one step and ``done {timings}``; ``stop`` ends it."""
    import torch.distributed as dist

    from common.log import setup_logging

    setup_logging()
    step, info = _build(job)
    print("ready", json.dumps(info), flush=True)
    while (line := sys.stdin.readline().strip()) == "go":
        print("done", json.dumps(step()), flush=True)
    if line != "stop":
        raise SystemExit("the benchmark parent went away")
    dist.barrier()
    dist.destroy_process_group()


# ---- the parent: the paths' rank processes, stepped in turns, quiet steps kept --------------------

def _cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(busy clock ticks of the whole machine, ticks of ``pids`` and this process), from /proc."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    ours = 0
    for pid in [*pids, os.getpid()]:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
    return user + nice + system + irq + softirq + steal, ours


class _Group:
    """The rank processes of one path of one configuration."""

    def __init__(self, job: dict, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(var, None)  # the ranks set their threads themselves (trainer policy)
        name = f"{job['config']}-{job['path']}-{job['world']}"
        fd, store = tempfile.mkstemp(prefix=f"{name}-", suffix=".store", dir=tmp)  # empty and new: a file store
        os.close(fd)
        job = {**job, "store": store}
        self.job, self.procs, self.logs, self.steps = job, [], [], []
        for rank in range(job["world"]):
            self.logs.append(tmp / f"{name}-{rank}.log")
            args = [sys.executable, __file__, "--child", json.dumps({**job, "rank": rank})]
            with open(self.logs[-1], "w") as log:
                self.procs.append(
                    subprocess.Popen(args, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
                )

    def _say(self, word: str) -> None:
        for proc in self.procs:
            proc.stdin.write(word + "\n")
            proc.stdin.flush()

    def _expect(self, word: str) -> list[dict]:
        """Each rank's next ``word {json}`` line."""
        answers = []
        for rank, proc in enumerate(self.procs):
            while (line := proc.stdout.readline()) and not line.startswith(word + " "):
                pass  # a library printing to stdout
            if not line:
                proc.wait()
                tail = self.logs[rank].read_text()[-3000:]
                raise SystemExit(f"{self.job['config']}/{self.job['path']}, {self.job['world']} rank(s): rank {rank} failed:\n{tail}")
            answers.append(json.loads(line[len(word) + 1 :]))
        return answers

    def ready(self) -> None:
        infos = self._expect("ready")
        self.info = {**infos[0], "flops": sum(i["flops"] for i in infos)}  # every rank's share of the step

    def step(self) -> dict:
        """One step on every rank; the slowest rank's time, the mean embedding share."""
        self._say("go")
        ranks = self._expect("done")
        return {"step": max(r["step"] for r in ranks), "share": statistics.mean(r["embedding"] / r["step"] for r in ranks)}

    def finish(self) -> float:
        """Stops the ranks; their peak RSS in MB (``os.wait4``, the largest rank's)."""
        self._say("stop")
        peaks = []
        for rank, proc in enumerate(self.procs):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = status  # reaped here; Popen must not wait on it again
            if status != 0:
                raise SystemExit(f"rank {rank} of {self.job} exited with {status}:\n{self.logs[rank].read_text()[-3000:]}")
            peaks.append(usage.ru_maxrss / 1024)
        return max(peaks)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


def _others(pids: list[int], seconds: float, run=None) -> tuple[float, object]:
    """Share of the machine's CPU used by processes other than ``pids`` and this one while
    ``run()`` runs (or for ``seconds`` when it is None); -> (share, what ``run`` returned)."""
    busy0, ours0 = _cpu_ticks(pids)
    t0 = time.perf_counter()
    out = run() if run is not None else time.sleep(seconds)
    busy1, ours1 = _cpu_ticks(pids)
    capacity = (time.perf_counter() - t0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return max(0, (busy1 - busy0) - (ours1 - ours0) - 1) / capacity, out  # - 1: a tick of rounding


def _run_paths(job: dict, paths: tuple[str, ...], tmp: Path, max_wait: float) -> dict[str, dict]:
    """The ``paths`` of one configuration, built side by side and stepped in turns (one step of
    each, ...), so that they share the machine's conditions. A measured step counts as quiet if the
    rest of the machine used at most ``QUIET_SHARE`` of its CPU meanwhile; after a disturbed step
    the next one waits (up to ``max_wait`` s in all) for the machine to be quiet. Steps go on until
    each path has ``steps`` quiet ones, or has run ``MAX_TRIES`` times that many; the median is over
    the quiet steps if there are at least half of ``steps`` (and 3), else over all (flagged noisy)."""
    groups = {path: _Group({**job, "path": path}, tmp) for path in paths}
    try:
        for g in groups.values():
            g.ready()  # each rank has run one step already, counting its FLOPs
        for _ in range(job["warmup"] - 1):
            for g in groups.values():
                g.step()
        pids = [p.pid for g in groups.values() for p in g.procs]
        quiet = {path: [] for path in paths}
        ran = {path: [] for path in paths}
        wait_until, disturbed = time.monotonic() + max_wait, False
        todo = lambda path: len(quiet[path]) < job["steps"] and len(ran[path]) < MAX_TRIES * job["steps"]  # noqa: E731
        while any(todo(path) for path in paths):
            for path, g in groups.items():
                if not todo(path):
                    continue
                while disturbed and time.monotonic() < wait_until and _others(pids, 0.5)[0] > QUIET_SHARE:
                    pass
                share, s = _others(pids, 0, g.step)
                ran[path].append(s)
                disturbed = share > QUIET_SHARE
                if not disturbed:
                    quiet[path].append(s)
        results = {}
        for path, g in groups.items():
            used = quiet[path] if len(quiet[path]) >= max(3, job["steps"] // 2) else ran[path]
            median = statistics.median(s["step"] for s in used)
            results[path] = {
                "examples_s": job["world"] * job["batch"] / median,
                "step_ms": 1000 * median,
                "gflops": g.info["flops"] / median / 1e9,
                "mflop_ex": g.info["flops"] / (job["world"] * job["batch"]) / 1e6,
                "embedding_share": statistics.median(s["share"] for s in used),
                "quiet": f"{len(quiet[path])}/{len(ran[path])}",
                "noisy": used is ran[path],  # too few quiet steps: the median is over all of them
                **g.info,
            }
        for path, g in groups.items():
            results[path]["peak_mb"] = g.finish()
        return results
    finally:
        for g in groups.values():
            g.kill()


def _plan_summary(plan: dict) -> str:
    by_type: dict[str, list[str]] = {}
    for table, kind in plan.items():
        by_type.setdefault(kind, []).append(table)
    # The small data-parallel tables only by count; the sharded ones by name.
    return "; ".join(f"{kind}: {len(t)} tables" if kind == "data_parallel" else f"{kind}: {', '.join(sorted(t))}" for kind, t in sorted(by_type.items()))


def _ceilings(threads: list[int]) -> dict[int, dict[str, float]]:
    """The GEMM ceilings for each thread count, each measured in a process of its own."""
    out = {}
    for n in sorted(set(threads)):
        code = f"import json, bench.bench_train as b; print(json.dumps(b._gemm_ceilings({n})))"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(n)}
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        out[n] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a generated `small` world to reuse (default: generate one into a temp dir, ~10 s)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=10, help="quiet steps measured per path (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps run first and not measured (the first counts FLOPs)")
    p.add_argument("--max-wait", type=float, default=90.0, help="seconds per configuration to wait for a quiet machine")
    p.add_argument("--no-reference", action="store_true", help="skip the reference path (no speed-up line)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        raise SystemExit("--steps, --warmup and --batch-size must be >= 1 (one warm-up step at least: the first step pays for allocation)")

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="derm-bench-train-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "small")
            cmd = [sys.executable, "-m", "data.synthetic", "--preset", "small", "--out", data]
            subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
        ceilings = _ceilings([max(1, cores // w) for w in args.ranks])
        import torch

        print(
            f"machine: {platform.machine()}, {cores} cores; python {platform.python_version()}; torch {torch.__version__}; "
            f"ctr source of the small world; batch {args.batch_size} per rank; median of {args.steps} quiet steps after {args.warmup} warm-up"
        )
        print("GEMM ceilings (best torch.mm GFLOP/s): " + "; ".join(
            f"{n} thread(s): float32 {c['float32']:,.0f}, bfloat16 {c['bfloat16']:,.0f}" for n, c in ceilings.items()))
        header = (
            f"{'config':<9}{'path':<11}{'ranks':>6}{'thr':>4}{'prec':>6}{'examples/s':>12}{'vs ref':>8}{'TR/base':>9}{'step ms':>9}"
            f"{'MFLOP/ex':>10}{'GFLOP/s':>9}{'%fp32':>7}{'%bf16':>7}{'emb %':>7}{'peak MB':>9}{'quiet':>13}"
        )
        print(header)
        print("-" * len(header))
        plans, speedups = [], []
        for config in args.configs:
            paths = ("reference", "baseline", "torchrec") if config in REFERENCE_CONFIGS and not args.no_reference else ("baseline", "torchrec")
            for world in args.ranks:
                job = {"config": config, "world": world, "data": data, "batch": args.batch_size, "batches": args.warmup + args.steps}
                results = _run_paths({**job, "steps": args.steps, "warmup": args.warmup}, paths, Path(tmp), args.max_wait)
                base, ref = results["baseline"], results.get("reference")
                for path, r in results.items():
                    c = ceilings[r["threads"]]  # the ranks' threads follow the same policy
                    share = lambda dtype: 100 * r["gflops"] / (world * c[dtype])  # noqa: E731  (each rank its own ceiling)
                    vs_ref = f"{ref['step_ms'] / r['step_ms']:.2f}" if ref is not None else ""
                    tr = f"{r['examples_s'] / base['examples_s']:.2f}" if path == "torchrec" else ""
                    print(
                        f"{config:<9}{path:<11}{world:>6}{r['threads']:>4}{r['precision']:>6}{r['examples_s']:>12,.0f}{vs_ref:>8}{tr:>9}"
                        f"{r['step_ms']:>9,.0f}{r['mflop_ex']:>10.1f}{r['gflops']:>9.1f}{share('float32'):>7.1f}{share('bfloat16'):>7.1f}"
                        f"{100 * r['embedding_share']:>7.0f}{r['peak_mb']:>9,.0f}{r['quiet'] + (' noisy' if r['noisy'] else ''):>13}",
                        flush=True,
                    )
                    if r["plan"] and path == "torchrec":
                        plans.append(f"  {config}, {world} rank(s): {_plan_summary(r['plan'])}")
                if ref is not None:
                    speedups.append((config, world, ref["step_ms"] / results["torchrec"]["step_ms"]))
        print("TorchRec plans (sharding type: tables):")
        print("\n".join(plans))
        for config, world, x in speedups:
            print(f"  {config}, {world} rank(s): reference / default step time = {x:.2f}x")
        if speedups:
            print(f"speed-up vs reference: {speedups[0][2]:.2f}x")


if __name__ == "__main__":
    main()
