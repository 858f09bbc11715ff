"""Dataset audits: Spectral Relevance Analysis (SpRAy, Lapuschkin et al. 2019, "Unmasking Clever Hans predictors").

The relevance maps of one class are downsampled, normalised and clustered spectrally; a cluster whose maps
look alike but unlike the rest (a watermark in a corner, a frame, a background) is a strategy of the model
that a reviewer then inspects. ``lrpc audit`` writes a self-contained HTML report: the eigengap plot that
chose the number of clusters, a 2-D spectral embedding, and per cluster its prototype (mean) heatmap and the
heatmaps and images of the members nearest to it.

Needs scikit-learn (``pip install 'lrpc[ray]'``) and Pillow.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .errors import InputError, one_line
from .imaging import heatmap, pil_image

MANIFEST = "manifest.jsonl"
DENSE_MAX = 2000  # maps up to which the graph is a dense matrix (N^2 floats: 32 MB at 2000)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def collect(folder, cls=None) -> list[dict]:
    """The maps to audit: rows ``{"relevance", "source", "target"}`` of ``folder``'s manifest (written by
    ``lrpc explain --manifest`` / ``--ray``; rows with an error are left out), or of the Parquet shards in
    ``folder`` (``lrpc.ray.explain(...).write_parquet(folder)``; the row's array under ``"array"``), or else every
    ``.npy`` in ``folder``. ``cls``: keep only the rows whose target is this class (not with bare .npy files)."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{d}: no such directory" if not d.exists() else f"{d}: not a directory")
    manifest = d / MANIFEST
    if manifest.is_file():
        rows = []
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"{manifest}:{n}: not a JSON line") from None
            if row.get("status") == "ok" and row.get("relevance"):
                rows.append({"relevance": d / row["relevance"], "source": row.get("source"),
                             "target": row.get("target")})
        rows = list({str(r["relevance"]): r for r in rows}.values())  # a re-run's rows replace earlier ones
    elif any(d.glob("*.parquet")):
        rows = _shard_rows(sorted(d.glob("*.parquet")), cls)
    else:
        if cls is not None:
            raise InputError(f"{d}: --class needs {MANIFEST} (written by lrpc explain --manifest); without it "
                             f"every .npy of the directory is audited (explain them with --target C)")
        rows = [{"relevance": p, "source": None, "target": None} for p in sorted(d.glob("*.npy"))]
    if cls is not None:
        rows = [r for r in rows if str(r["target"]) == str(cls)]
    if len(rows) < 3:
        which = f" of class {cls}" if cls is not None else ""
        raise InputError(f"{d}: {len(rows)} relevance maps{which}; an audit needs at least 3")
    return rows


def _shard_rows(shards: list, cls) -> list[dict]:
    """The rows without an error of Parquet shards of :func:`lrpc.ray.explain` (``cls``: of that target only)."""
    try:
        import pyarrow.parquet as parquet
        import ray.data  # noqa: F401  (registers Ray's tensor column type with pyarrow)
    except ImportError:
        raise InputError("Parquet shards need ray[data]: pip install 'lrpc[ray]'") from None
    filters = [("error", "=", "")] + ([("target", "=", str(cls))] if cls is not None else [])
    try:
        table = parquet.read_table([str(p) for p in shards], columns=["path", "target", "relevance", "error"],
                                   filters=filters)
    except Exception as err:
        raise InputError(f"{shards[0].parent}: cannot read the Parquet shards ({one_line(err)})") from None
    arrays = table.column("relevance").combine_chunks().to_numpy_ndarray() if table.num_rows else []
    return [{"relevance": f"{p}", "source": p, "target": t, "array": a}
            for p, t, a in zip(table.column("path").to_pylist(), table.column("target").to_pylist(), arrays)]


def relevance_map(path) -> np.ndarray:
    """A 2-D map (channels summed) from an ``lrpc explain`` .npy (or an array): [1,C,H,W], [1,K,C,H,W] (rank 1
    taken), [C,H,W], [H,W] or channels-last [1,H,W,C]."""
    try:
        a = path if isinstance(path, np.ndarray) else np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"{path}: cannot read relevance ({type(err).__name__})") from None
    a = np.asarray(a, dtype=np.float64)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 4:  # [K, C, H, W]: the top-ranked class
        a = a[0]
    if a.ndim == 3:
        a = a.sum(axis=0) if a.shape[0] <= 4 or a.shape[-1] > 4 else a.sum(axis=-1)
    if a.ndim != 2:
        raise InputError(f"{path}: expected one image's relevance, got shape {a.shape}")
    return a


def features(maps, size: int = 32) -> np.ndarray:
    """Each map downsampled (area average) to at most ``size`` pixels a side and scaled to max |R| = 1. ``maps``: a
    list or an iterable (one map in memory at a time), all of one size."""
    Image = pil_image()
    rows, shape = [], None
    for m in maps:
        if shape is None:
            shape = h, w = m.shape
            scale = min(1.0, size / max(h, w))
            th, tw = max(1, round(h * scale)), max(1, round(w * scale))
        elif m.shape != shape:
            raise InputError(f"relevance maps of different sizes ({', '.join(map(str, sorted({shape, m.shape})))}); "
                             f"audit maps of one model input size")
        if (th, tw) != (h, w):
            m = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((tw, th), Image.BOX))
        m = np.asarray(m, dtype=np.float64)
        rows.append((m / max(np.abs(m).max(), 1e-12)).ravel())
    return np.stack(rows)


def spectral(x: np.ndarray, clusters: int | None = None, neighbors: int | None = None, max_clusters: int = 10,
             seed: int = 0) -> dict:
    """SpRAy's analysis of feature rows ``x``: a symmetric k-nearest-neighbour graph, the eigenvalues of its
    normalised Laplacian (the number of clusters is the one before the largest eigengap unless ``clusters``
    is given), spectral clustering on that graph and a 2-D spectral embedding. Up to :data:`DENSE_MAX` rows the
    graph is a dense matrix (all eigenvalues); beyond, a sparse one and only the smallest eigenvalues (memory
    O(N k), not O(N^2))."""
    try:
        from sklearn.cluster import SpectralClustering
        from sklearn.neighbors import kneighbors_graph
    except ImportError:
        raise InputError("lrpc audit needs scikit-learn: pip install 'lrpc[ray]' (or pip install scikit-learn)") \
            from None
    n = len(x)
    k = neighbors or max(2, min(10, int(round(np.log2(n))) + 1, n - 1))
    k = min(k, n - 1)
    top = min(max_clusters, n - 1)
    if clusters and not 1 <= int(clusters) <= n:
        raise InputError(f"--clusters {clusters}: expected 1..{n} (the number of maps)")
    graph = kneighbors_graph(x, k, mode="connectivity", include_self=False)
    if n > DENSE_MAX:
        return _sparse_spectral(graph, clusters, top, k, seed)
    dense = graph.toarray()
    affinity = np.maximum(dense, dense.T)
    degree = affinity.sum(axis=1)
    inv = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(n) - inv[:, None] * affinity * inv[None, :]
    values, vectors = np.linalg.eigh(laplacian)
    values = np.clip(values, 0.0, None)
    chosen = _chosen(values, clusters, top)
    if chosen == 1:
        labels = np.zeros(n, dtype=int)
    else:
        labels = SpectralClustering(n_clusters=chosen, affinity="precomputed", random_state=seed,
                                    assign_labels="kmeans").fit_predict(affinity)
    return _result(chosen, labels, values[:top + 1], vectors[:, 1:3] * inv[:, None], k)


def _sparse_spectral(graph, clusters, top: int, k: int, seed: int) -> dict:
    """:func:`spectral` on a sparse k-nearest-neighbour ``graph`` of many maps: the smallest eigenvalues of the
    normalised Laplacian I - D^-1/2 A D^-1/2 are 1 - the largest of D^-1/2 A D^-1/2 (ARPACK), and the clusters are
    k-means on the first eigenvectors scaled by D^-1/2, as scikit-learn's spectral clustering does."""
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import KMeans

    n = graph.shape[0]
    affinity = graph.maximum(graph.T).tocsr().astype(np.float64)
    inv = 1.0 / np.sqrt(np.maximum(np.asarray(affinity.sum(axis=1)).ravel(), 1e-12))
    walk = diags(inv) @ affinity @ diags(inv)
    m = max(top + 1, int(clusters or 0), 3)
    start = np.random.default_rng(seed).uniform(-1.0, 1.0, n)  # (ARPACK's start vector: reproducible results)
    mu, vectors = eigsh(walk, k=m, which="LA", v0=start)
    order = np.argsort(-mu)
    values, vectors = np.clip(1.0 - mu[order], 0.0, None), vectors[:, order]
    chosen = _chosen(values, clusters, top)
    if chosen == 1:
        labels = np.zeros(n, dtype=int)
    else:
        labels = KMeans(n_clusters=chosen, random_state=seed, n_init=10).fit_predict(vectors[:, :chosen]
                                                                                    * inv[:, None])
    return _result(chosen, labels, values[:top + 1], vectors[:, 1:3] * inv[:, None], k)


def _chosen(values: np.ndarray, clusters, top: int) -> int:
    """``clusters``, or the number before the largest eigengap among the first ``top`` + 1 eigenvalues."""
    gaps = np.diff(values[:top + 1])  # gaps[i]: lambda_{i+2} - lambda_{i+1} (1-based): i + 1 clusters
    return int(clusters) if clusters else int(np.argmax(gaps[1:]) + 2) if top >= 2 else 1


def _result(chosen: int, labels, eigenvalues, embedding, k: int) -> dict:
    """The analysis, clusters numbered by size (largest first); ``embedding``: the first non-trivial eigenvectors
    of the random walk."""
    if embedding.shape[1] < 2:
        embedding = np.pad(embedding, ((0, 0), (0, 2 - embedding.shape[1])))
    order = sorted(range(chosen), key=lambda c: (-int((labels == c).sum()), c))
    labels = np.array([order.index(c) for c in labels])
    return {"clusters": chosen, "labels": labels, "eigenvalues": eigenvalues, "embedding": embedding,
            "neighbors": k}


def audit(folder, cls=None, clusters: int | None = None, size: int = 32, neighbors: int | None = None,
          examples: int = 8, max_clusters: int = 10) -> dict:
    """SpRAy on ``folder`` (see :func:`collect`); returns the analysis and per row its cluster. ``report``
    renders it as HTML. The maps are read one at a time: only their downsampled features stay in memory."""
    rows = collect(folder, cls)
    result = spectral(features((_map(r) for r in rows), size), clusters, neighbors, max_clusters)
    result.update(rows=rows, cls=cls, folder=str(folder), examples=examples)
    return result


def _map(row: dict) -> np.ndarray:
    """The 2-D map of a row of :func:`collect`, read again each time (not kept: a class may have many)."""
    return relevance_map(row["array"] if "array" in row else row["relevance"])


def _unit(m: np.ndarray) -> np.ndarray:
    return m / max(np.abs(m).max(), 1e-12)


def summary(result: dict) -> dict:
    """The JSON-able part of an audit: the number of clusters, the eigenvalues and each map's cluster."""
    return {"class": result["cls"], "clusters": result["clusters"], "neighbors": result["neighbors"],
            "eigenvalues": [float(v) for v in result["eigenvalues"]],
            "sizes": [int((result["labels"] == c).sum()) for c in range(result["clusters"])],
            "members": [{"relevance": str(r["relevance"]), "source": r["source"], "cluster": int(c)}
                        for r, c in zip(result["rows"], result["labels"])]}


def report(result: dict) -> str:
    """A self-contained HTML page (images as base64 PNG, plots as inline SVG)."""
    labels, rows = result["labels"], result["rows"]
    k = result["clusters"]
    sizes = ", ".join(str(int((labels == c).sum())) for c in range(k))
    title = f"SpRAy audit of {html.escape(result['folder'])}" + \
        (f", class {html.escape(str(result['cls']))}" if result["cls"] is not None else "")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:70em} img{image-rendering:pixelated;margin:2px} "
             "figure{display:inline-block;margin:4px;text-align:center;font-size:70%} "
             ".cluster{border-top:1px solid #ccc;margin-top:1.5em}</style></head><body>",
             f"<h1>{title}</h1>",
             f"<p>{len(rows)} relevance maps, {k} clusters (sizes {sizes}), "
             f"{result['neighbors']}-nearest-neighbour graph. A small cluster whose prototype puts its relevance "
             f"somewhere else than the rest (a corner, a border, the background) is worth a look.</p>",
             "<h2>Eigenvalues of the graph Laplacian</h2><p>The number of clusters is the index before the largest "
             "gap (unless given with --clusters).</p>", _eigen_svg(result["eigenvalues"], k),
             "<h2>Spectral embedding</h2>", _scatter_svg(result["embedding"], labels)]
    for c in range(k):
        members = np.flatnonzero(labels == c)
        total = None
        for i in members:  # (in order: the sum np.mean makes)
            m = _unit(_map(rows[i]))
            total = m if total is None else total + m
        prototype = total / len(members)
        distance = {i: float(np.abs(_unit(_map(rows[i])) - prototype).sum()) for i in members}
        near = sorted(members, key=distance.get)[:result["examples"]]
        color = PALETTE[c % len(PALETTE)]
        parts.append(f"<div class='cluster'><h2 style='color:{color}'>Cluster {c}: {len(members)} maps</h2>"
                     f"<figure>{_img(heatmap(prototype), 128)}<figcaption>prototype (mean)</figcaption></figure>")
        for i in near:
            name = html.escape(Path(rows[i]["source"] or rows[i]["relevance"]).name)
            picture = _source(rows[i]["source"])
            parts.append(f"<figure>{_img(heatmap(_map(rows[i])), 96)}"
                         + (f"{_img(picture, 96)}" if picture is not None else "")
                         + f"<figcaption>{name}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _source(path):
    """The input image of a row, or None where it cannot be read (the report still shows the heatmap)."""
    if not path:
        return None
    try:
        with pil_image().open(path) as im:
            return im.convert("RGB")
    except Exception:
        return None


def _img(picture, width: int) -> str:
    buffer = io.BytesIO()
    scale = max(1, width // max(picture.size))
    if scale > 1:
        picture = picture.resize((picture.size[0] * scale, picture.size[1] * scale), pil_image().NEAREST)
    picture.save(buffer, format="PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _eigen_svg(values, chosen: int, w: int = 420, h: int = 180) -> str:
    top = max(float(np.max(values)), 1e-9)
    step = (w - 40) / max(len(values), 1)
    points, marks = [], []
    for i, v in enumerate(values):
        x, y = 30 + step * (i + 0.5), h - 20 - (h - 40) * float(v) / top
        points.append(f"{x:.1f},{y:.1f}")
        fill = "#d62728" if i == chosen - 1 else "#1f77b4"
        marks.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{fill}'/>"
                     f"<text x='{x:.1f}' y='{h - 5}' font-size='10' text-anchor='middle'>{i + 1}</text>")
    return (f"<svg width='{w}' height='{h}' xmlns='http://www.w3.org/2000/svg'>"
            f"<line x1='30' y1='{h - 20}' x2='{w - 10}' y2='{h - 20}' stroke='#999'/>"
            f"<text x='2' y='14' font-size='10'>{top:.3g}</text>"
            f"<polyline points='{' '.join(points)}' fill='none' stroke='#1f77b4'/>{''.join(marks)}</svg>")


def _scatter_svg(xy: np.ndarray, labels, w: int = 420, h: int = 320) -> str:
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    p = (xy - lo) / span
    dots = "".join(f"<circle cx='{10 + (w - 20) * a:.1f}' cy='{h - 10 - (h - 20) * b:.1f}' r='3' "
                   f"fill='{PALETTE[int(c) % len(PALETTE)]}' fill-opacity='0.7'/>" for (a, b), c in zip(p, labels))
    return f"<svg width='{w}' height='{h}' xmlns='http://www.w3.org/2000/svg'>" \
           f"<rect width='{w}' height='{h}' fill='none' stroke='#ccc'/>{dots}</svg>"
