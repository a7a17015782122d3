"""The paper's EMA analysis (Sec. 3.2, Figure 5) on top of `edm2.metrics.sweep`:
the groups of weight tensors whose EMA length is varied one at a time
(Fig. 5b), the optimum of a sweep with the range of lengths that are as good
within the evaluation noise, and the figures of `edm2 sweep`: one curve per
group, the optimum's drift over training time (Fig. 5c), and EMA length x
guidance weight as a heat map (docs/ema-analysis.md).

Nothing here generates images; `edm2.metrics.sweep.sweep` does, and calls these.
"""
from __future__ import annotations

import fnmatch
import math

import numpy as np

from ..utils.errors import EDM2Error
from ..utils.fileio import pyplot, save_figure
from .dynamics import bucket_of, bucket_sort_key

__all__ = ["DEFAULT_GROUPS", "group_tensors", "optimum", "guidance_grid", "plot_groups", "plot_times",
           "plot_guidance_heatmap"]

# The default grouping (`group_tensors(names, "default")`), the first match wins:
#   attention  the self-attention layers of every block (attn_qkv, attn_proj);
#   enc-RxR    the other tensors of the encoder blocks at resolution R (edm2.analysis.dynamics.bucket_of);
#   dec-RxR    the same for the decoder blocks;
#   embedding  the noise and class embedding outside the blocks (emb_fourier, emb_noise, emb_label);
#   output     the output layer (out_conv, out_gain);
# other tensors (those of the input convolution enc.RxR_conv are in enc-RxR) form "other"; the learned
# loss weighting u(sigma) (logvar_*) is used in training only and is in no group.
DEFAULT_GROUPS = "default"


def _default_group(name: str) -> str | None:
    parts = name.split(".")
    if any(p.startswith("attn") for p in parts):
        return "attention"
    bucket = bucket_of(name)
    if bucket is not None:
        return bucket
    if parts[0].startswith("logvar"):
        return None
    if any(p.startswith(("emb", "map_")) for p in parts[:-1]):
        return "embedding"
    if any(p.startswith("out") for p in parts):
        return "output"
    return "other"


def parse_groups(groups) -> list[tuple[str, list[str]]] | None:
    """'default' (or None, True) -> None (the default grouping); 'NAME=glob,NAME2=glob;glob2' or
    a {name: pattern(s)} dict -> [(name, [patterns])], in order. Raises `EDM2Error` naming `groups`."""
    if groups is None or groups is True or (isinstance(groups, str) and groups.strip() == DEFAULT_GROUPS):
        return None
    if isinstance(groups, dict):
        items = [(k, [v] if isinstance(v, str) else list(v)) for k, v in groups.items()]
    else:
        items = []
        for part in str(groups).split(","):
            if not part.strip():
                continue
            name, eq, pats = part.partition("=")
            if not eq or not name.strip() or not pats.strip():
                raise EDM2Error(f"groups={groups}: {part.strip()!r} is not NAME=PATTERN; give 'default' or "
                                f"NAME=glob pairs on tensor names, e.g. 'attn=*attn*,dec=*.dec.*' (several patterns "
                                f"of one group joined by ';')")
            items.append((name.strip(), [p.strip() for p in pats.split(";") if p.strip()]))
    if not items:
        raise EDM2Error(f"groups={groups}: no group; give 'default' or NAME=glob pairs on tensor names")
    names = [n for n, _ in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise EDM2Error(f"groups={groups}: group {dup!r} is given twice; join its patterns with ';'")
    return items


def group_tensors(names, groups=DEFAULT_GROUPS) -> dict[str, list[str]]:
    """{group: tensor names} of a snapshot's tensor `names` (the keys of its state dict).

    groups: 'default' (`DEFAULT_GROUPS`: the encoder blocks per resolution, the decoder blocks per
    resolution, attention, embedding, output; see the comment above), or NAME=glob pairs
    ('attn=*attn*,dec=*.dec.*'; `fnmatch` patterns on the full tensor name, several joined by ';'),
    or a {name: pattern(s)} dict. A tensor belongs to the first group that matches it; tensors that
    match none keep the base EMA length. A group matching no tensor raises `EDM2Error`."""
    names = list(names)
    items = parse_groups(groups)
    out: dict[str, list[str]] = {}
    if items is None:
        for n in names:
            g = _default_group(n)
            if g is not None:
                out.setdefault(g, []).append(n)
        blocks = sorted((g for g in out if "-" in g), key=bucket_sort_key)
        order = blocks + [g for g in ("attention", "embedding", "output", "other") if g in out]
        return {g: out[g] for g in order}
    for name, _ in items:
        out[name] = []
    for n in names:
        for name, pats in items:
            if any(fnmatch.fnmatchcase(n, p) for p in pats):
                out[name].append(n)
                break
    empty = [name for name, v in out.items() if not v]
    if empty:
        pats = dict(items)[empty[0]]
        raise EDM2Error(f"groups={','.join(f'{k}={chr(59).join(v)}' for k, v in items)}: group {empty[0]!r} "
                        f"({';'.join(pats)}) matches no tensor (or only tensors of earlier groups); tensor names "
                        f"look like {names[len(names) // 2]!r}")
    return out


def optimum(rows: list[dict], metric: str) -> dict:
    """The best EMA length of one curve (rows of one time, guidance, solver and steps) ->
    {"row": the row with the lowest mean `metric`, "lo", "hi": the shortest and longest EMA lengths
    whose mean is within one spread (`metric`_std, the best point's) of the best mean, "edge": the
    best length is the shortest or the longest swept (the optimum may lie outside the sweep)}."""
    best = min(rows, key=lambda r: r[metric])
    spread = best.get(f"{metric}_std") or 0.0
    near = [r["ema_std"] for r in rows if r[metric] <= best[metric] + spread]
    lengths = [r["ema_std"] for r in rows]
    edge = len(set(lengths)) > 1 and best["ema_std"] in (min(lengths), max(lengths))
    return {"row": best, "lo": min(near), "hi": max(near), "edge": edge}


def _curve(rows, metric, key="ema_std"):
    pts = sorted((r[key], r[metric], r.get(f"{metric}_std") or 0.0) for r in rows)
    return [np.array(v, dtype=float) for v in zip(*pts)]


def _plot_band(ax, rows, metric, key="ema_std", **kw):
    x, y, s = _curve(rows, metric, key)
    line, = ax.plot(x, y, marker="o", ms=3, **{"ls": "-", **kw})
    if s.any():
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15, lw=0)
    return line


def plot_groups(group_rows: list[dict], base_rows: list[dict], metrics: list[str], base_std: float,
                path=None) -> bytes:
    """PNG (bytes; also written to `path`) of the per-group sensitivity, like the paper's Figure 5b:
    one column per metric, x = the EMA length sigma_rel of one group (every other tensor at
    `base_std`), y = the metric as measured (not normalised), one curve per group, the global
    sweep (every tensor at that length) dashed black; bands: one spread (several seed sets)."""
    plt = pyplot()
    groups = list(dict.fromkeys(r["group"] for r in group_rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for col, m in enumerate(metrics):
        ax = axes[0, col]
        for g in groups:
            rows = [r for r in group_rows if r["group"] == g]
            line = _plot_band(ax, rows, m, label=g)
            best = min(rows, key=lambda r: r[m])
            ax.plot(best["ema_std"], best[m], "o", ms=8, mfc="none", color=line.get_color())
        if base_rows:
            _plot_band(ax, base_rows, m, color="k", ls="--", label="all tensors")
        ax.axvline(base_std, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("EMA length sigma_rel of the group (others at the dotted line)")
        ax.set_ylabel(m)
        ax.set_title(f"{m}: one group's EMA length varied, others at sigma_rel {base_std:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_times(rows: list[dict], metrics: list[str], path=None) -> bytes:
    """PNG of the optimum over training time (paper Figure 5c): top, the metric against the EMA
    length, one curve per snapshot time (nimg), optimum ringed; bottom, the best EMA length against
    nimg with the range of lengths within one spread of it. `rows`: one guidance, solver and steps."""
    plt = pyplot()
    times = sorted({r["nimg"] for r in rows})
    fig, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 7), squeeze=False)
    for col, m in enumerate(metrics):
        ax, ax2 = axes[0, col], axes[1, col]
        best, lo, hi = [], [], []
        for t in times:
            curve = [r for r in rows if r["nimg"] == t]
            line = _plot_band(ax, curve, m, label=f"nimg {t}")
            o = optimum(curve, m)
            ax.plot(o["row"]["ema_std"], o["row"][m], "o", ms=8, mfc="none", color=line.get_color())
            best.append(o["row"]["ema_std"])
            lo.append(o["lo"])
            hi.append(o["hi"])
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        best, lo, hi = map(np.array, (best, lo, hi))
        ax2.errorbar(times, best, yerr=[best - lo, hi - best], fmt="o-", capsize=3)
        ax2.set_xlabel("training images (nimg)")
        ax2.set_ylabel(f"best sigma_rel ({m})")
        ax2.set_title("optimum per snapshot time (bars: lengths within one spread)", fontsize=9)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def guidance_grid(rows: list[dict], metric: str, key: str = "") -> tuple[list, list, np.ndarray]:
    """(sigma_rels, guidance weights, grid[len(ws), len(sigma_rels)]) of `metric` (NaN where no row),
    or of `metric` + key (e.g. "_std"). `rows`: one time, solver and steps."""
    sigma_rels = sorted({r["ema_std"] for r in rows})
    ws = sorted({r["guidance"] for r in rows})
    grid = np.full((len(ws), len(sigma_rels)), math.nan)
    for r in rows:
        grid[ws.index(r["guidance"]), sigma_rels.index(r["ema_std"])] = r[metric + key]
    return sigma_rels, ws, grid


def plot_guidance_heatmap(rows: list[dict], metrics: list[str], path=None, title: str = "") -> bytes:
    """PNG of EMA length x guidance weight (rows: guidance, columns: sigma_rel), one heat map per
    metric with its values written in the cells and the best EMA length of each guidance weight
    boxed (the overall best filled). `rows`: one time, solver and steps."""
    plt = pyplot()
    n_s, n_w = len({r["ema_std"] for r in rows}), len({r["guidance"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=((2.7 + 0.9 * n_s) * len(metrics), 1.6 + 0.5 * n_w),
                             squeeze=False)
    for col, m in enumerate(metrics):
        ax = axes[0, col]
        sigma_rels, ws, grid = guidance_grid(rows, m)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r")
        fig.colorbar(im, ax=ax, label=m)
        for i in range(len(ws)):
            for j in range(len(sigma_rels)):
                if np.isfinite(grid[i, j]):  # dark text on the light (low) cells, light text on the dark ones
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=6,
                            color="k" if im.norm(grid[i, j]) < 0.5 else "w")
            if np.isfinite(grid[i]).any():
                j = int(np.nanargmin(grid[i]))
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="r", lw=1.5))
        i, j = np.unravel_index(np.nanargmin(grid), grid.shape)
        ax.plot(j + 0.3, i + 0.25, "r*", ms=9)  # in the cell's corner, its value stays readable
        ax.set_xticks(range(len(sigma_rels)), [f"{s:.3f}" for s in sigma_rels], rotation=45, fontsize=7)
        ax.set_yticks(range(len(ws)), [f"{w:g}" for w in ws], fontsize=7)
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_ylabel("guidance weight")
        ax.set_title(f"{m} (box: best length per guidance; star: best){title}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
