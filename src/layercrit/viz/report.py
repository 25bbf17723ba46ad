"""A self-contained HTML report: what was run, the figures, the tables and a plain reading.

`index.html` embeds every figure as a PNG data URI and needs no network: it opens from a USB
stick. Figures span the page's width and open at full size on a click; tables are sortable by
clicking a header (a few lines of inline JavaScript). Tables show criticality and accuracy in %,
as the figures do; p-values below 0.001 as <0.001; a note says why a value is missing.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .._utils.display import format_number, format_p
from .._utils.io import atomic_path, check_output_dir, make_output_dir
from ..errors import LayercritError
from ..results import UNMODIFIED, CriticalityResult, summarize_trials

__all__ = ["AUXILIARY", "CRITICAL", "build_report"]

AUXILIARY = 10.0  # criticality (%) below which a layer is called auxiliary
CRITICAL = 50.0  # criticality (%) from which a layer is called critical

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
figure{margin:1rem 0}figure img{display:block;width:100%;max-width:100%;height:auto;max-height:85vh;object-fit:contain;
border:1px solid #eee;cursor:zoom-in}figcaption{font-size:.9rem;color:#555}
.lightbox{position:fixed;inset:0;z-index:10;overflow:auto;background:rgba(20,20,20,.88);cursor:zoom-out;padding:1rem;
text-align:center}.lightbox img{max-width:none;background:#fff}.settings{font-size:.85rem;color:#444}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;
text-align:right}th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.reading{background:#f3f8ff;border-left:4px solid #3b7dd8;padding:.6rem 1rem}.meta td{text-align:left}
.crit{color:#b4231b;font-weight:600}.aux{color:#2c7a3f;font-weight:600}.scroll{max-height:28rem;overflow:auto}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
 var t=th.closest('table'),b=t.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th),
 asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 var rows=Array.prototype.slice.call(b.rows);rows.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,
 p=parseFloat(a),q=parseFloat(c);var r=(!isNaN(p)&&!isNaN(q))?p-q:a.localeCompare(c);return asc?r:-r});
 rows.forEach(function(r){b.appendChild(r)})})});
document.querySelectorAll('figure img').forEach(function(img){img.addEventListener('click',function(){
 var box=document.createElement('div'),big=new Image();box.className='lightbox';big.src=img.src;big.alt=img.alt;
 box.appendChild(big);box.addEventListener('click',function(){box.remove()});document.body.appendChild(box)})});
document.addEventListener('keydown',function(e){var box=document.querySelector('.lightbox');
 if(e.key==='Escape'&&box)box.remove()});
window.addEventListener('load',function(){var imgs=document.images,ok=0,w=1;for(var k=0;k<imgs.length;k++){
 if(imgs[k].complete&&imgs[k].naturalWidth>0)ok++;var f=imgs[k].closest('figure');
 if(f)w=Math.min(w,imgs[k].getBoundingClientRect().width/f.getBoundingClientRect().width)}
 document.body.setAttribute('data-images',ok+'/'+imgs.length);document.body.setAttribute('data-figure-width',w.toFixed(3))});
"""


@dataclass
class _Page:
    title: str
    sections: list[str] = field(default_factory=list)
    figures: int = 0

    def add(self, heading: str, *parts: str) -> None:
        self.sections.append(f"<h2>{html.escape(heading)}</h2>\n" + "\n".join(parts))


_FIGURE_PX = 1600  # natural width of an embedded figure: sharp at the page's ~1070 px, larger when opened


def _figure(fig, caption: str) -> str:
    buf = io.BytesIO()
    dpi = min(300.0, max(110.0, _FIGURE_PX / fig.get_figwidth()))
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" title="click to enlarge" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _significant(v: float) -> str:
    return "—" if math.isnan(v) else "0" if abs(v) < 1e-12 else f"{v:.4g}"


def _table(df: pd.DataFrame, digits: int = 2, limit: int = 400, significant: Sequence[str] = ()) -> str:
    """A sortable table; floats with `digits` decimals (rounding noise as 0) or, in the columns
    `significant`, 4 significant digits; p-value columns (`*_p`) as <0.001 below display precision;
    NaN as "—"."""
    kind = {i: "p" if str(c).endswith("_p") else "g" if c in significant else "f" for i, c in enumerate(df.columns)}

    def cell(i, v):
        if isinstance(v, float):
            fmt = {"p": format_p, "g": _significant}.get(kind[i], lambda x: format_number(x, digits))
            return html.escape(fmt(v))
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(i, v)}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in df.head(limit).itertuples(index=False))
    more = f"<p>… {len(df) - limit} more rows in the data files.</p>" if len(df) > limit else ""
    return f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'


def _meta(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f'<table class="meta">{rows}</table>'


def _try(page: _Page, parts: list[str], make: Callable, caption: str) -> None:
    """Add a figure; a figure that cannot be drawn from these results is skipped with a note."""
    try:
        fig, _ = make()
    except (LayercritError, KeyError, ValueError) as e:
        parts.append(f"<p><em>{html.escape(caption)}: not drawn ({html.escape(str(e).splitlines()[0])}).</em></p>")
        return
    parts.append(_figure(fig, caption))
    page.figures += 1


def _reading(means: pd.Series, what: str, auxiliary: float, critical: float) -> str:
    """Plain-language verdict per layer from mean criticality in % (index: layer labels), by the
    report's own thresholds: a layer is called the most critical only if it is critical by them."""
    means = means.dropna()
    crit = [k for k, v in means.items() if v >= critical]
    aux = [k for k, v in means.items() if v < auxiliary]
    mid = [k for k, v in means.items() if auxiliary <= v < critical]
    fmt = lambda xs: ", ".join(html.escape(str(x)) for x in xs) or "none"  # noqa: E731
    if not len(means):
        verdict = ""
    elif crit:
        verdict = f" The most critical layer is {html.escape(str(means.idxmax()))} ({means.max():.1f} %)."
    elif len(aux) == len(means):
        verdict = (f" No layer is critical: every layer stays below {auxiliary:g} % (the largest, "
                   f"{html.escape(str(means.idxmax()))}, {means.max():.1f} %).")
    else:
        verdict = (f" No layer is critical by the threshold of {critical:g} %; the largest mean criticality is "
                   f"{means.max():.1f} % ({html.escape(str(means.idxmax()))}).")
    return (
        f'<div class="reading"><p>Under {html.escape(what)}, <span class="crit">critical</span> layers '
        f"(mean criticality ≥ {critical:g} %: re-setting them changes the decisions): {fmt(crit)}.</p>"
        f'<p><span class="aux">Auxiliary</span> layers (&lt; {auxiliary:g} %: the decisions barely change): {fmt(aux)}.</p>'
        f"<p>In between: {fmt(mid)}.{verdict}</p></div>"
    )


_DEFINITION = ("<p>Criticality is 1 − cos(p, q) between the softmax outputs before and after the reset, averaged "
               "over the evaluation samples: 0 % means unchanged decisions, 100 % completely different ones.</p>")


def _results_report(page: _Page, result: CriticalityResult, auxiliary: float, critical: float) -> None:
    from .. import viz as plots
    from ..analyses.adaptive import format_adaptive

    t = result.table
    cfg = result.config
    page.add("What was run", _meta({
        "model": cfg.get("model", ", ".join(map(str, t["model"].unique()))),
        "data": cfg.get("data", "?"), "evaluation subset": f"n = {cfg.get('n', t['n'].iloc[0])}, identity {cfg.get('data_identity', '?')}, "
        f"data_seed {cfg.get('data_seed', '?')}",
        "probes": ", ".join(p["probe"] + (f" → {p['target']}" if p.get("target", p["probe"]) != p["probe"] else "")
                            for p in cfg.get("probe_details", [])) or ", ".join(t["probe"].unique()),
        "trials": cfg.get("trials", t["trial"].max() + 1), "seed": cfg.get("seed", "?"),
        "versions": ", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items()),
    } | ({"adaptive sampling": format_adaptive(cfg["adaptive"])} if "adaptive" in cfg else {})))
    layers = t[t["layer"] != UNMODIFIED]
    targets = layers["target"].fillna("")
    key = layers["probe"] + targets.where((targets == "") | (targets == layers["probe"]), " → " + targets).where(
        (targets != "") & (targets != layers["probe"]), "")
    first = key.iloc[0] if len(key) else ""
    main = layers[key == first]
    readings = "".join(_reading(layers[key == k].groupby("label", sort=False)["criticality"].mean() * 100,
                                f"the probe {k}", auxiliary, critical) for k in dict.fromkeys(key))
    base = t[t["layer"] == UNMODIFIED]
    acc = f" The unmodified model's accuracy is {100 * base['accuracy'].iloc[0]:.2f} %." if len(base) and pd.notna(base["accuracy"].iloc[0]) else ""
    page.add("Main result", readings + f"<p>{html.escape(acc)}</p>" + _DEFINITION)
    parts: list[str] = []
    _try(page, parts, lambda: plots.criticality_heatmap(t), "Mean criticality (%) of every layer under each probe.")
    _try(page, parts, lambda: plots.criticality_bars(main), f"Criticality under {first}: mean over trials with 95 % CI.")
    page.add("Figures", *parts)
    s = summarize_trials(t)
    titles = {"criticality_mean": "criticality %", "criticality_sem": "s.e. %", "criticality_ci_low": "95 % CI low",
              "criticality_ci_high": "95 % CI high", "accuracy_mean": "accuracy %",
              "accuracy_drop_mean": "accuracy drop (points)", "agreement_mean": "agreement %", "kl_mean": "KL"}
    if "half_width" in s:  # adaptive sampling: the 95 % half-width over trials and images, and the images used
        titles = {"criticality_mean": "criticality %", "half_width": "± 95 % (points)", "n": "images"} | titles
    cols = [c for c in ["label", "probe", "target", "trials", *titles] if c in s]
    shown = s[cols].copy()
    for c in cols:
        if c in titles and c not in ("kl_mean", "n"):
            shown[c] = shown[c] * 100
    page.add("Per-layer summary (%, mean over trials; KL in nats)", _table(shown.rename(columns=titles), 2, significant=["KL"]))


def _store_report(page: _Page, store_path: Path, baseline: str | None, auxiliary: float, critical: float) -> None:
    from .. import viz as plots
    from ..zoo.compare import column_title, readable_models, summarize
    from ..zoo.store import Store

    with Store(store_path, create=False) as store:
        runs, models_meta = store.runs(), store.models()
        probes = store.results()["probe"].unique().tolist()
        probe = "rerandomize" if "rerandomize" in probes else next((p for p in probes if p != "none"), None)
        if probe is None:
            raise LayercritError(f"results store {str(store_path)!r} holds no results")
        by = [c for c in ("accuracy",) if c in models_meta.columns and models_meta[c].notna().sum() >= 3]
        if baseline is None and "category" in models_meta:
            base_rows = models_meta[models_meta["category"].astype(str).str.lower() == "baseline"]
            baseline = base_rows["model"].iloc[0] if len(base_rows) else None
        c = summarize(store, probe=probe, by=by, baseline=baseline)
    last = runs.iloc[-1] if len(runs) else None
    page.add("What was run", _meta({
        "results store": str(store_path), "models": f"{len(c.models)} ({', '.join(c.models['model'].astype(str)[:20])}"
        f"{' …' if len(c.models) > 20 else ''})", "categories": ", ".join(c.categories["category"].astype(str)),
        "probe": probe, "data subsets": ", ".join(sorted(set(models_meta["data_identity"].dropna().astype(str)))) or "—",
        "sweeps": len(runs), "versions": f"layercrit {last['layercrit_version']}, torch {last['torch_version']}" if last is not None else "—",
    }))
    means = c.layers.set_index("label")["mean"] * 100
    page.add("Main result", _reading(means, f"'{probe}', averaged over {len(c.models)} models", auxiliary, critical)
             + _DEFINITION)
    parts: list[str] = []
    _try(page, parts, lambda: plots.criticality_heatmap(c, baseline=baseline),
         "Criticality (%) per model and layer, grouped by training category; margins: mean ± std.")
    if baseline:
        _try(page, parts, lambda: plots.difference_heatmap(c, baseline), f"Difference to the baseline {baseline} (percentage points).")
    _try(page, parts, lambda: plots.spread_heatmap(c), "Spread of criticality over trials (std, %).")
    if by:
        _try(page, parts, lambda: plots.criticality_vs_accuracy(c.models), "Average criticality vs accuracy, by category.")
    if "epsilon" in c.models.columns:
        _try(page, parts, lambda: plots.criticality_vs_metadata(c.models), "Average criticality vs training attack budget ε.")
    page.add("Figures", *parts)
    page.add("Models (%: criticality and measured accuracy; zoo metadata as written)", _table(readable_models(c.models), 2))
    page.add("Layers (mean ± std across models, %)", _table(c.layers.assign(mean=c.layers["mean"] * 100,
                                                                             std=c.layers["std"] * 100), 2))
    if len(c.correlations):
        corr = c.correlations.assign(against=c.correlations["against"].map(lambda a: column_title(a).replace(" %", "")))
        page.add("Correlations", _table(corr, 3))


def _checkpoints_report(page: _Page, run_dir: Path, auxiliary: float, critical: float, progress: bool,
                        modcrit: dict | None) -> None:
    from .. import viz as plots
    from ..analyses.modcrit import describe_search, network_note, run_module_criticality
    from ..analyses.robustness import robustness, weight_distances
    from ..data import load_data
    from ..training.checkpoints import Run

    run = Run(run_dir)
    rob = robustness(run, trials=3, progress=progress)
    dist = weight_distances(run)
    train = load_data(run.train_data, split="train")
    settings = {"epsilon": [0.05, 0.1], "alphas": 11, "noise_draws": 4, "sigma_rtol": 0.05,
                "train_subset": min(500, len(train))} | (modcrit or {})
    mc = run_module_criticality(run, train, progress=progress, **settings)
    cfg = run.manifest.get("config", {})
    page.add("What was run", _meta({
        "run": str(run_dir), "model": f"{run.model_spec} {run.model_kwargs}", "training data": cfg.get("data"),
        "evaluation data": rob.config.get("data"), "evaluation subset": f"n = {rob.config.get('n')}, identity {rob.config.get('data_identity')}",
        "checkpoints": ", ".join(f"E{e}" for e in run.epochs), "re-randomization trials": "3, seed 0",
        "module criticality": describe_search(mc.config),
        "versions": ", ".join(f"{k} {v}" for k, v in rob.config.get("versions", {}).items()),
    }))
    t = rob.table
    rr = t[t["target"] == "rerandomize"].groupby("label", sort=False)["criticality"].mean() * 100
    e0 = t[(t["target"] == "E0") & (t["probe"] == "reinit")].groupby("label", sort=False)["criticality"].mean() * 100
    page.add("Main result", _reading(rr, "re-randomization", auxiliary, critical)
             + _reading(e0, "re-initialization to checkpoint 0", auxiliary, critical) + _DEFINITION)
    parts: list[str] = []
    _try(page, parts, lambda: plots.robustness_heatmap(t), "Test error after resetting each layer to each checkpoint (Zhang et al. Fig. 1a).")
    _try(page, parts, lambda: plots.distance_heatmaps(dist), "Distance of each layer to its initial value (ℓ2/√dim and ℓ∞).")
    _try(page, parts, lambda: plots.modcrit_curves(mc.curve), "Training error along the path from θ⁰ (α = 0) to θᶠ (α = 1).")
    _try(page, parts, lambda: plots.network_criticality_vs_epsilon(mc.network), "Network criticality vs ε.")
    page.add("Figures", *parts)
    search = f'<p class="settings">These numbers depend on the search: {html.escape(describe_search(mc.config))}.</p>'
    loss = mc.config.get("loss", "error")
    pct = ["epsilon", "threshold", "loss", "train_loss"] if loss == "error" else []
    module = mc.table[["label", "epsilon", "alpha", "sigma", "mu", "delta_norm", "n_params", "loss", "note"]]
    network = mc.network.assign(note=[network_note(r, loss) for _, r in mc.network.iterrows()])
    for name, df in (("Module criticality", module), ("Network criticality", network)):
        df = df.assign(**{c: df[c] * 100 for c in pct if c in df})
        df = df.rename(columns={c: f"{c} %" for c in pct})
        page.add(name, search, _table(df, 2, significant=[c for c in df.columns if not str(c).endswith(" %")]))


def _proxies_report(page: _Page, result, auxiliary: float, critical: float) -> None:
    """A `layercrit proxies` result: the proxies, their agreement with the real criticality of the
    same blocks (`compare_proxies`), and the scatter and bump figures."""
    from .. import viz as plots
    from ..analyses.proxies.compare import compare_proxies

    cfg = result.config
    page.add("What was run", _meta({
        "model": cfg.get("model", ", ".join(map(str, result.table.get("model", pd.Series(["?"])).unique()))),
        "data": cfg.get("data", "?"), "blocks": result.table["layer"].nunique(),
        "criticality probes": ", ".join(sorted(result.criticality["probe"].unique())) if len(result.criticality) else "—",
        "versions": ", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items()),
    }))
    shown = result.table.copy()
    page.add("Proxies (one pass over the data, block outputs before any final norm)", _table(shown, 4))
    if result.criticality.empty:
        page.add("Agreement with real criticality", "<p>The file holds no criticality of the same blocks "
                 "(run <code>layercrit proxies --against rerandomize</code>), so nothing is compared.</p>")
        return
    c = compare_proxies(result)
    crit = result.criticality
    page.add("Main result", "".join(
        _reading(crit[crit["probe"] == p].groupby("layer", sort=False)["criticality"].mean() * 100, f"the probe {p}",
                 auxiliary, critical) for p in crit["probe"].unique()))
    parts: list[str] = []
    _try(page, parts, lambda: plots.proxy_scatter(result), "Each proxy against the real criticality (%) of the same block.")
    _try(page, parts, lambda: plots.proxy_bump(result), "Rankings of the blocks (1 = pruned first) by proxy and by criticality.")
    page.add("Figures", *parts)
    page.add("Agreement with real criticality (Spearman ρ, Kendall τ, bootstrap 95 % over samples)", _table(c.correlations, 3))
    if len(c.pruning):
        page.add("Pruning the k least important blocks: by proxy vs by criticality", _table(c.pruning, 3))


def build_report(
    out: str | Path,
    *,
    store: str | Path | None = None,
    results: str | Path | CriticalityResult | None = None,
    checkpoints: str | Path | None = None,
    proxies: str | Path | object | None = None,
    baseline: str | None = None,
    title: str | None = None,
    auxiliary: float = AUXILIARY,
    critical: float = CRITICAL,
    progress: bool = False,
    modcrit: dict | None = None,
) -> Path:
    """Write `out/index.html` from one source: a results store, a results file, a checkpoint folder,
    or a `layercrit proxies` file.

    Args:
        out: the report folder (created if missing; its parent must exist).
        store: a results store (cross-model report).
        results: a single-model results file (or `CriticalityResult`).
        checkpoints: a training run's checkpoint folder (robustness, distances, module criticality).
        proxies: a file of `layercrit proxies --out` (or `ProxyResult`): the proxies beside the real
            criticality of the same blocks (`compare_proxies`).
        baseline: the baseline model of a store report (default: the first of category "baseline").
        title: page title.
        auxiliary, critical: thresholds (%) of the plain-language reading.
        progress: show progress bars while computing a checkpoint report.
        modcrit: `ModcritConfig` settings of a checkpoint report (default: ε 0.05 and 0.1, 11 α,
            4 noise draws, σ to 5 %, at most 500 training samples).
    """
    sources = [s for s in (store, results, checkpoints, proxies) if s is not None]
    if len(sources) != 1:
        raise LayercritError("give exactly one of --store, --results, --checkpoints or --proxies")
    if not 0 <= auxiliary < critical <= 100:
        raise LayercritError(f"Expected 0 ≤ auxiliary < critical ≤ 100, got {auxiliary} and {critical}")
    out = check_output_dir(out)  # created with its parents when the page is written
    page = _Page(title or "layercrit report")
    if results is not None:
        result = results if isinstance(results, CriticalityResult) else CriticalityResult.load(results)
        _results_report(page, result, auxiliary, critical)
    elif store is not None:
        _store_report(page, Path(store), baseline, auxiliary, critical)
    elif proxies is not None:
        from ..analyses.proxies.result import ProxyResult

        _proxies_report(page, proxies if isinstance(proxies, ProxyResult) else ProxyResult.load(proxies), auxiliary, critical)
    else:
        _checkpoints_report(page, Path(checkpoints), auxiliary, critical, progress, modcrit)
    from .._version import __version__

    stamp = f"{dt.datetime.now().isoformat(timespec='seconds')} · layercrit {__version__} · Python {platform.python_version()}"
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(page.title)}</title>'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f'<meta name="layercrit-figures" content="{page.figures}"><style>{_CSS}</style></head><body>'
           f"<h1>{html.escape(page.title)}</h1><p>{html.escape(stamp)}</p>{''.join(page.sections)}"
           f"<script>{_JS}</script></body></html>")
    make_output_dir(out)
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return path
