"""Approximate-nearest-neighbour index over one published Pin version, for user -> Pin retrieval
(paper Appendix C.3: "Pin embeddings are built into Pin indexing for ranking and retrieval").

    index = AnnIndex.build(pin_ids, pin_embeddings)      # [P] int64, [P, E] float32
    ids, scores = index.search(user_embeddings, k=100)   # [Q, k] int64 Pin ids, [Q, k] float32
    index.save("runs/ann/ctr-pin-2026-01-03"); AnnIndex.load("runs/ann/ctr-pin-2026-01-03")

Glossary: P Pins in the index, Q queries, E embedding dim, k results per query.

Scores are cosine similarities: both sides are L2-normalised (DERM's towers emit unit vectors, but
a moving-average pool (paper Appendix C.2) shrinks norms), so FAISS's inner product is the cosine.
Which FAISS index, by pool size (`AnnConfig`):
- up to ``exact_max_rows`` Pins: ``IndexFlatIP``, exact search;
- above, by ``kind``:
  - ``"ivfpq"`` (the default on CPU): ``IndexIVFPQFastScan`` (4-bit PQ codes, ``pq_m`` of them a
    Pin, scanned with SIMD lookup tables) finds ``refine_k_factor * k`` candidates in ``nprobe``
    lists, and ``IndexRefineFlat`` re-ranks them by their exact inner products. On 1M x 64 Pins
    that is ~4.5x the QPS of IVF-Flat at the same recall@100 (0.955; 69-119x exact search), for 32
    bytes a Pin of codes besides the float vectors. `bench/bench_serving.py` sweeps these kinds
    and settings and names the fastest at recall@100 >= 0.95: the defaults below (docs/lifecycle.md);
  - ``"ivf"`` (the default when searching on GPU): ``IndexIVFFlat``, the float vectors scanned;
  - ``"hnsw"``: ``IndexHNSWFlat`` (no training, but ~6 min to build 1M Pins on 2 cores, and at
    recall@100 0.95 fewer QPS than ivfpq there).
  Both IVF kinds use ``nlist = nlist_factor * sqrt(P)`` lists, k-means trained on a random sample
  of ``train_points_per_list * nlist`` Pins, and search ``nprobe`` lists per query.
FAISS stores positions 0..P-1; ``ids.npy`` beside the index maps them back to Pin ids (one id map
for every index kind, GPU indexes included). ``MANIFEST.json`` lists the xxh3-128 digests of the
three files, computed while `save` writes them and checked by every `load` (``common.digest``): a
damaged index is refused naming the file instead of answering searches.

GPU: with ``use_gpu`` (default: when ``faiss.get_num_gpus() > 0``, i.e. the faiss-gpu build on a
GPU machine) a flat or IVF-Flat index is copied to all GPUs for search
(``faiss.index_cpu_to_all_gpus``); building and saving use the CPU copy. The fast-scan/refine and
HNSW indexes have no GPU version and stay on CPU, so ``kind="auto"`` builds IVF-Flat where it will
search on GPU. This path is the same code with one switch, but it is not exercised by the CPU test
suite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import faiss
import numpy as np

from common.digest import MANIFEST, IntegrityError, digest_bytes, hashing_writer, verify_manifest, write_manifest
from common.files import staged_dir

log = logging.getLogger("derm.embeddings.ann")

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
GPU_KINDS = ("flat", "ivf")
"""Kinds that `faiss.index_cpu_to_all_gpus` can copy to GPUs; the others search on CPU."""


@dataclasses.dataclass
class AnnConfig:
    """How to index a Pin version; the defaults suit 64-dim DERM embeddings on CPU."""

    exact_max_rows: int = 100_000
    """Pools up to this many Pins get the exact IndexFlatIP (brute force is fast enough there)."""
    kind: str = "auto"
    """Index for larger pools: "ivfpq" (IVF-PQ fast-scan + exact re-ranking), "ivf" (IndexIVFFlat),
    "hnsw" (IndexHNSWFlat), or "auto": "ivfpq" when searching on CPU, "ivf" on GPU."""
    nlist_factor: float = 4.0
    """IVF lists = nlist_factor * sqrt(P); FAISS's guideline is 4-16 * sqrt(P)."""
    nprobe: int = 0
    """IVF lists searched per query; 0 = max(32, nlist // 32): 125 of 4,000 lists at 1M Pins, ~3% of
    them, for recall@100 ~0.955 on the bench's Pins (256 lists: 0.97 at ~2/3 of the QPS)."""
    pq_m: int = 0
    """ivfpq: 4-bit PQ codes per Pin; must divide E. 0 = E (one dim each, E/2 bytes a Pin). At E=64,
    E/2 codes needed k_factor 8 for the same recall, and then answered fewer QPS."""
    refine_k_factor: float = 2.0
    """ivfpq: PQ candidates re-ranked exactly, as a multiple of k (1.5 lost recall; 4 gained little)."""
    train_points_per_list: int = 64
    """IVF k-means trains on this many sampled Pins per list (FAISS warns below 39)."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    hnsw_ef_construction: int = 128
    """HNSW build-time beam width."""
    hnsw_ef_search: int = 128
    """HNSW search-time beam width (recall vs. QPS)."""
    use_gpu: bool | None = None
    """Search on all GPUs; None = when faiss sees a GPU."""
    seed: int = 0
    """Seeds the training sample and k-means."""

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "ivf", "ivfpq", "hnsw"):
            raise ValueError(f"AnnConfig.kind must be 'auto', 'ivfpq', 'ivf' or 'hnsw', not {self.kind!r}")
        positive = ("exact_max_rows", "nlist_factor", "train_points_per_list", "hnsw_m", "hnsw_ef_construction")
        for name in (*positive, "hnsw_ef_search"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AnnConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.refine_k_factor < 1:
            raise ValueError(f"AnnConfig.refine_k_factor must be >= 1, got {self.refine_k_factor!r}")
        if self.pq_m < 0:
            raise ValueError(f"AnnConfig.pq_m must be >= 0 (0 = one code per dim), got {self.pq_m!r}")
        if self.nprobe < 0:
            raise ValueError(f"AnnConfig.nprobe must be >= 0 (0 = automatic), got {self.nprobe!r}")

    def index_kind(self) -> str:
        """The kind built above ``exact_max_rows``: ``kind``, with "auto" resolved for this machine."""
        if self.kind != "auto":
            return self.kind
        return "ivf" if _want_gpu(self.use_gpu) else "ivfpq"


def _unit_rows(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """A float32 C-contiguous copy of x [R, E] with unit-norm rows (zero rows stay zero)."""
    arr = np.asarray(x)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        want = f"[R, {dim}]" if dim is not None else "[R, E]"
        raise ValueError(f"{what} must have shape {want}, got {arr.shape}")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


class AnnIndex:
    """A FAISS index over one Pin version plus its position -> Pin id map.

    Args:
        index: a trained, filled FAISS index over P vectors (CPU).
        ids: [P] int64 Pin ids, ``ids[i]`` for FAISS position i.
        kind: "flat", "ivf", "ivfpq" or "hnsw".
        use_gpu: search on all GPUs (None: when faiss sees one; only for the `GPU_KINDS`).
    """

    def __init__(self, index: faiss.Index, ids: np.ndarray, kind: str, use_gpu: bool | None = None) -> None:
        if index.ntotal != len(ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index, self.ids, self.kind = index, np.asarray(ids, np.int64), kind
        self.on_gpu = _want_gpu(use_gpu) and kind in GPU_KINDS
        self._search_index = faiss.index_cpu_to_all_gpus(index) if self.on_gpu else index

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return f"AnnIndex(kind={self.kind!r}, pins={len(self)}, dim={self.dim}, gpu={self.on_gpu})"

    @classmethod
    def build(cls, ids: np.ndarray, embeddings: np.ndarray, config: AnnConfig | None = None) -> "AnnIndex":
        """Indexes Pins ``ids`` [P] (unique int64) with ``embeddings`` [P, E]."""
        config = config or AnnConfig()
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got dtype {ids.dtype} and shape {ids.shape}")
        vectors = _unit_rows(embeddings, "embeddings")
        if len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} embeddings")
        if len(ids) == 0:
            raise ValueError("cannot index an empty Pin pool")
        n, dim = vectors.shape
        t0 = time.perf_counter()
        kind = config.index_kind()
        if n <= config.exact_max_rows:
            kind, index = "flat", faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.hnsw_ef_construction
            index.hnsw.efSearch = config.hnsw_ef_search
        else:
            index = _train_ivf(vectors, config, pq=kind == "ivfpq")
        index.add(vectors)
        log.info("built %s index over %d pins (dim %d) in %.1f s", kind, n, dim, time.perf_counter() - t0)
        return cls(index, ids.astype(np.int64), kind, config.use_gpu)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k Pins for each query (user embedding).

        Args:
            queries: [Q, E] user embeddings (normalised here).
            k: results per query; where k > P the tail is id -1, score -inf.

        Returns:
            ids [Q, k] int64 Pin ids, best first; scores [Q, k] float32 cosine similarities.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _unit_rows(queries, "queries", self.dim)
        scores, pos = self._search_index.search(q, int(k))
        missing = pos < 0
        ids = self.ids[np.where(missing, 0, pos)]
        ids[missing] = -1
        scores[missing] = -np.inf
        return ids, scores

    @property
    def search_params(self) -> dict:
        """The search-time knobs saved with the index (and re-applied on load)."""
        if self.kind == "ivf":
            return {"nprobe": int(faiss.extract_index_ivf(self.index).nprobe)}
        if self.kind == "ivfpq":  # an IndexRefineFlat around the IVF-PQ index
            return {"nprobe": int(faiss.extract_index_ivf(self.index).nprobe), "k_factor": self.index.k_factor}
        if self.kind == "hnsw":
            return {"ef_search": int(self.index.hnsw.efSearch)}
        return {}

    def set_search_params(
        self, nprobe: int | None = None, ef_search: int | None = None, k_factor: float | None = None
    ) -> None:
        """Recall vs. speed at search time: IVF lists probed per query, the HNSW beam width, or the
        candidates (a multiple of k) that an ivfpq index re-ranks exactly."""
        if nprobe is not None:
            if self.kind not in ("ivf", "ivfpq") or nprobe < 1:
                raise ValueError(f"nprobe must be a positive integer and applies to IVF indexes (this one: {self.kind})")
            faiss.extract_index_ivf(self.index).nprobe = nprobe
            if self.on_gpu:  # the GPU copy does not share the CPU index's settings
                faiss.GpuParameterSpace().set_index_parameter(self._search_index, "nprobe", nprobe)
        if ef_search is not None:
            if self.kind != "hnsw" or ef_search < 1:
                raise ValueError(f"ef_search must be a positive integer and applies to HNSW indexes (this one: {self.kind})")
            self.index.hnsw.efSearch = ef_search
        if k_factor is not None:
            if self.kind != "ivfpq" or k_factor < 1:
                raise ValueError(f"k_factor must be >= 1 and applies to ivfpq indexes (this one: {self.kind})")
            self.index.k_factor = float(k_factor)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``index.faiss``, ``ids.npy``, ``ann.json`` and their ``MANIFEST.json`` into a new
        directory ``path`` (built beside it and renamed into place, so a reader never sees half an
        index); each file is hashed as it is written."""
        path = Path(path)
        if path.exists():
            raise ValueError(f"ANN index directory {path} already exists; indexes are immutable like their versions")
        with staged_dir(path) as tmp:
            with hashing_writer(tmp / "index.faiss") as index_file:
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(index_file.write))
            with hashing_writer(tmp / "ids.npy") as ids_file:
                np.save(ids_file, self.ids)
            meta = json.dumps({"kind": self.kind, "dim": self.dim, "pins": len(self), **self.search_params}, indent=1)
            (tmp / "ann.json").write_text(meta)
            write_manifest(tmp, {"index.faiss": index_file.digest, "ids.npy": ids_file.digest,
                                 "ann.json": digest_bytes(meta.encode())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, use_gpu: bool | None = None) -> "AnnIndex":
        """Reads an index written by `save`, after checking its files against their manifest (an
        :class:`~common.digest.IntegrityError` names a damaged one); an index saved before
        manifests existed is read after a warning."""
        path = Path(path)
        if not (path / "ann.json").exists():
            raise ValueError(f"{path} is not an ANN index directory (no ann.json)")
        what = f"ANN index {path}"
        if not verify_manifest(path, what):
            log.warning("%s: no %s (saved before indexes had one): its files are read unchecked", what, MANIFEST)
        meta = json.loads((path / "ann.json").read_text())
        try:
            index = faiss.read_index(str(path / "index.faiss"))
        except RuntimeError as e:  # FAISS's C++ error, e.g. "read error in ...: 3100 != 3200"
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise IntegrityError(f"{what}: {path / 'index.faiss'} is truncated or unreadable ({reason}); "
                                 "build the index again") from None
        loaded = cls(index, np.load(path / "ids.npy"), meta["kind"], use_gpu)
        loaded.set_search_params(**{k: meta[k] for k in ("nprobe", "ef_search", "k_factor") if k in meta})
        return loaded


def _want_gpu(use_gpu: bool | None) -> bool:
    """``use_gpu``, or (None) whether this FAISS build sees a GPU."""
    if use_gpu is None:
        return faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    return bool(use_gpu)


def _train_ivf(vectors: np.ndarray, config: AnnConfig, pq: bool) -> faiss.Index:
    """A trained, empty IVF index for ``vectors`` [P, E] (unit rows): IndexIVFFlat, or with ``pq``
    an IndexIVFPQFastScan inside an IndexRefineFlat (which keeps the float vectors for re-ranking)."""
    n, dim = vectors.shape
    nlist = max(1, min(int(round(config.nlist_factor * math.sqrt(n))), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    if pq:
        pq_m = config.pq_m or dim
        if dim % pq_m:
            raise ValueError(f"AnnConfig.pq_m={pq_m} must divide the embedding dim {dim}")
        index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, pq_m, 4, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = config.seed
    sample = min(n, config.train_points_per_list * nlist)
    index.cp.max_points_per_centroid = max(1, sample // nlist)  # FAISS would subsample again otherwise
    rng = np.random.default_rng(config.seed)
    train = vectors if sample == n else vectors[np.sort(rng.choice(n, sample, replace=False))]
    index.train(train)  # k-means for the lists; with pq, then the PQ codebooks on the same sample
    index.nprobe = min(nlist, config.nprobe or max(32, nlist // 32))
    if not pq:
        return index
    refined = faiss.IndexRefineFlat(index)  # keeps a reference to `index` (FAISS's Python wrapper)
    refined.k_factor = config.refine_k_factor
    return refined
