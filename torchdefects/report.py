"""One self-contained HTML page that shows a whole batch run: ``OUT/report.html``.

The page has its CSS and script inline and loads nothing from the network; pictures are
referenced by relative links inside the output folder, so the folder can be moved or
zipped with its report. It shows, from the top (see ``docs/outputs.md``):

- a summary: inputs, NG (defective), OK, errors, regions; the pixel threshold and
  where it came from (its provenance); the run's settings from ``OUT/manifest.json``
  when the run wrote one;
- a table of every input with its overlay as a thumbnail (linking to the full
  picture), verdict, score, region count, worst region score and area; click a header to
  sort, use the buttons to show NG, errors or OK only (``report.html#filter=NG&sort=score``
  opens it that way);
- the error records with their messages.

``results.jsonl`` is read line by line. Runs larger than ``max_rows`` keep the
``max_rows`` rows that matter most in the table (NG first, then errors, then OK, by
score) and say so at the top; counts always cover every record.
"""

import heapq
import html
import json
import math
import numbers
import os
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["write_report"]

_MASK_EXTS = (".png", ".npy", ".npz")
_MAX_REGIONS_LISTED = 10


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}g}"


def _stream(path: str, notes: List[str]) -> Iterator[Tuple[int, Any]]:
    """(line number, object) per line; unparsable lines become notes, not crashes."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                torn = not raw.endswith(b"\n")
                what = "torn last line (a write cut short)" if torn else "unreadable line"
                notes.append(f"results.jsonl line {lineno}: {what} skipped ({type(e).__name__})")


def _inside(out_dir: str, rel: Any) -> Optional[str]:
    """``rel`` as a '/' path when it names an existing file inside ``out_dir``."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        return None
    rel = rel.replace(os.sep, "/")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return rel if os.path.isfile(os.path.join(out_dir, *parts)) else None


def _overlay_index(out_dir: str) -> Dict[str, str]:
    """Overlay name (its path under overlays/ without the final .png) -> relative path."""
    index: Dict[str, str] = {}
    root = os.path.join(out_dir, "overlays")
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(".png") and not f.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, f), out_dir).replace(os.sep, "/")
                index[rel[len("overlays/") : -len(".png")]] = rel
    return index


def _path_field(v: Any) -> Any:
    return v.get("path") if isinstance(v, dict) else v


def _find_overlay(out_dir: str, rec: Dict[str, Any], index: Dict[str, str]) -> Optional[str]:
    """The record's overlay: named in the record, else by the runner's naming rule."""
    d = rec.get("defects") if isinstance(rec.get("defects"), dict) else {}
    for v in (rec.get("overlay"), d.get("overlay")):  # type: ignore[union-attr]
        rel = _inside(out_dir, _path_field(v))
        if rel:
            return rel
    if not index:
        return None
    # The runner writes masks/NAME.ext and overlays/NAME.png for the same NAME.
    mask = _path_field(d.get("mask")) if d else None  # type: ignore[union-attr]
    if isinstance(mask, str) and mask.startswith("masks/"):
        name = mask[len("masks/") :]
        for ext in _MASK_EXTS:
            if name.endswith(ext) and name[: -len(ext)] in index:
                return index[name[: -len(ext)]]
    # Else NAME is the input's path relative to the input folder: the longest suffix.
    inp = rec.get("input")
    if isinstance(inp, str):
        parts = inp.replace("\\", "/").split("/")
        for i in range(len(parts)):
            name = "/".join(parts[i:])
            if name in index:
                return index[name]
    return None


def _verdict(rec: Dict[str, Any], n_regions: int) -> str:
    lab = rec.get("label")
    if isinstance(lab, str):
        low = lab.strip().lower()
        if low in ("ng", "anomalous", "anomaly", "defective", "bad", "1"):
            return "NG"
        if low in ("ok", "normal", "good", "0"):
            return "OK"
    elif isinstance(lab, (bool, int)):
        return "NG" if int(lab) else "OK"
    return "NG" if n_regions else "OK"


def _row(out_dir: str, lineno: int, rec: Any, index: Dict[str, str]) -> Dict[str, Any]:
    if not isinstance(rec, dict):
        return {
            "index": lineno - 1,
            "input": f"(line {lineno})",
            "status": "ERROR",
            "error_type": "bad_record",
            "message": "not a JSON object",
        }
    idx = rec.get("index")
    row: Dict[str, Any] = {
        "index": int(idx) if isinstance(idx, int) and not isinstance(idx, bool) else lineno - 1,
        "input": str(rec.get("input", f"(line {lineno})")),
    }
    if "error" in rec or not isinstance(rec.get("defects"), dict):
        err = rec.get("error") if isinstance(rec.get("error"), dict) else {}
        row.update(
            status="ERROR",
            error_type=str(err.get("type", "error")),  # type: ignore[union-attr]
            message=str(err.get("message", "")),  # type: ignore[union-attr]
        )
        return row
    d = rec["defects"]
    regions = [r for r in d.get("regions") or [] if isinstance(r, dict)]
    stats = d.get("map_stats_roi") if isinstance(d.get("map_stats_roi"), dict) else {}
    score = _num(rec.get("score"))
    if score is None:
        score = _num(stats.get("max"))  # type: ignore[union-attr]
    worst = max(
        (s for s in (_num(r.get("score_max")) for r in regions) if s is not None), default=None
    )
    area = sum(int(r["area"]) for r in regions if isinstance(r.get("area"), int))
    row.update(
        status=_verdict(rec, len(regions)),
        score=score,
        n_regions=len(regions),
        worst=worst,
        area=area if regions else None,
        threshold=_num(d.get("pixel_threshold")),
        overlay=_find_overlay(out_dir, rec, index),
        mask=_inside(out_dir, _path_field(d.get("mask"))),
        regions=[
            (_num(r.get("score_max")), r.get("area"), r.get("bbox_xyxy"), r.get("severity"))
            for r in regions[:_MAX_REGIONS_LISTED]
        ],
    )
    if "severity" in d:  # the run had severity_rules
        row["severity"] = d["severity"]
    return row


_PRIORITY = {"NG": 2, "ERROR": 1, "OK": 0}


def _key(row: Dict[str, Any]) -> Tuple[int, float, int]:
    s = row.get("score")
    return (_PRIORITY[row["status"]], s if s is not None else -math.inf, -row["index"])


def _flatten(obj: Any, prefix: str = "", depth: int = 0) -> List[Tuple[str, str]]:
    if isinstance(obj, dict) and obj and depth < 4:
        out: List[Tuple[str, str]] = []
        for k, v in obj.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1))
        return out
    if isinstance(obj, str):
        text = obj
    else:
        try:
            text = json.dumps(obj, allow_nan=True, default=str)
        except (TypeError, ValueError):
            text = str(obj)
    if len(text) > 300:
        text = text[:297] + "..."
    return [(prefix or "(value)", text)]


def _provenance_line(prov: Any) -> str:
    """One sentence on where the threshold came from (docs/calibration.md vocabulary).

    Older records (``source`` ``config`` / ``calibration``) read the same way.
    """
    if not isinstance(prov, dict):
        return "provenance not recorded"

    def calib(p: Dict[str, Any]) -> str:
        bits = [str(p.get("method", "calibration"))]
        if _num(p.get("q")) is not None:
            bits.append(f"q={p['q']}")
        if isinstance(p.get("calibration_map_count"), int):
            bits.append(f"over {p['calibration_map_count']} normal maps")
        if isinstance(p.get("calibration_pixel_count"), int):
            bits.append(f"({p['calibration_pixel_count']:,} pixels)")
        if p.get("created_at"):
            bits.append(f"on {p['created_at']}")
        return "calibrated: " + " ".join(bits)

    src = prov.get("source")
    if src == "explicit":
        return "given explicitly"
    if src in ("train_dir", "calibration"):
        return calib(prov)
    if src in ("infer_config", "config"):
        path = prov.get("path")
        line = f"from the config {path}" if path else "from the config"
        stored = prov.get("stored_provenance")
        if isinstance(stored, dict) and stored.get("source") in ("train_dir", "calibration"):
            line += "; " + calib(stored)
        return line
    return f"source: {src}" if src else "provenance: see the fields below"


def _normal_pixels_line(prov: Any) -> Optional[str]:
    """Where the threshold sits among the calibration's normal pixels, when recorded."""
    while isinstance(prov, dict):
        qs = prov.get("normal_quantiles")
        lo, hi = _num(prov.get("normal_min")), _num(prov.get("normal_max"))
        if isinstance(qs, dict) or lo is not None or hi is not None:
            bits = []
            if lo is not None:
                bits.append(f"min {_fmt(lo)}")
            if isinstance(qs, dict):
                for k in sorted(qs, key=lambda k: _num(_float_or_none(k)) or 0.0):
                    if _num(qs[k]) is not None:
                        bits.append(f"q{k} {_fmt(_num(qs[k]))}")
            if hi is not None:
                bits.append(f"max {_fmt(hi)}")
            return "normal pixels at calibration: " + ", ".join(bits) if bits else None
        prov = prov.get("stored_provenance")
    return None


def _float_or_none(text: Any) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _kv_table(pairs: List[Tuple[str, str]], cls: str = "kv") -> str:
    if not pairs:
        return "<p class='muted'>none recorded</p>"
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f"<table class='{cls}'>{rows}</table>"


def _href(rel: str) -> str:
    return html.escape(urllib.parse.quote(rel, safe="/~-_.!*'()"), quote=True)


_CSS = """
:root{--ng:#c62828;--ok:#2e7d32;--err:#8e24aa;--bg:#f6f7f9;--card:#fff;--line:#dde1e6;
--muted:#667;--accent:#00838f}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:var(--bg);color:#1d232a}
header{background:#1d232a;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px;font-weight:600}
header .sub{color:#b8c0c8;font-size:13px}
main{padding:16px 24px;max-width:1600px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 16px;
min-width:120px}
.card .n{font-size:26px;font-weight:650}
.card .l{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card.ng .n{color:var(--ng)}.card.ok .n{color:var(--ok)}.card.err .n{color:var(--err)}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;
margin-bottom:16px}
section h2{font-size:16px;margin:0 0 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
.grid section{margin-bottom:16px}
details summary{cursor:pointer;color:var(--accent)}
table.kv{border-collapse:collapse;font-size:13px}
table.kv th{text-align:left;font-weight:500;color:var(--muted);padding:2px 16px 2px 0;
vertical-align:top;white-space:nowrap}
table.kv td{padding:2px 0;font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.note{background:#fff8e1;border:1px solid #ffe082;border-radius:6px;padding:8px 12px;margin:8px 0}
.muted{color:var(--muted)}
.controls{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin-bottom:8px}
.controls button{border:1px solid var(--line);background:#fff;border-radius:16px;padding:4px 14px;
cursor:pointer;font:inherit}
.controls button.on{background:#1d232a;color:#fff;border-color:#1d232a}
table.results{border-collapse:collapse;width:100%}
table.results th{position:sticky;top:0;background:#eef1f4;text-align:left;padding:6px 8px;
border-bottom:2px solid var(--line);white-space:nowrap;user-select:none}
table.results th[data-type]{cursor:pointer}
table.results th[data-type]:hover{background:#e2e7ec}
table.results th[aria-sort=ascending]::after{content:" \\25B2"}
table.results th[aria-sort=descending]::after{content:" \\25BC"}
table.results td{padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:middle}
table.results td.num{text-align:right;font-variant-numeric:tabular-nums}
table.results td.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
word-break:break-all;max-width:420px}
table.results img{display:block;width:160px;height:auto;border:1px solid var(--line);
border-radius:4px;background:#222}
.badge{display:inline-block;min-width:44px;text-align:center;border-radius:4px;color:#fff;
font-weight:600;padding:1px 6px;font-size:12px}
.badge.NG{background:var(--ng)}.badge.OK{background:var(--ok)}.badge.ERROR{background:var(--err)}
.regions{font-size:12px;color:var(--muted);margin-top:4px}
tr[hidden]{display:none}
ul.errors{margin:0;padding-left:18px}
ul.errors li{margin:4px 0}
ul.errors code{font-size:12px}
"""

_JS = """
(function(){
  var table=document.getElementById('results');
  if(!table){return;}
  var tbody=table.tBodies[0], heads=table.tHead.rows[0].cells;
  var count=document.getElementById('shown'), buttons=document.querySelectorAll('[data-filter]');
  var state={filter:'all',sort:null,dir:-1};
  function val(tr,i,num){
    var v=tr.cells[i].getAttribute('data-v');
    if(v===null){v=tr.cells[i].textContent;}
    if(num){var f=parseFloat(v);return isNaN(f)?null:f;}
    return v.toLowerCase();
  }
  function sortBy(key,dir){
    var th=null;
    for(var j=0;j<heads.length;j++){
      heads[j].removeAttribute('aria-sort');
      if(heads[j].getAttribute('data-key')===key){th=heads[j];}
    }
    if(!th||!th.getAttribute('data-type')){return;}
    var i=th.cellIndex, num=th.getAttribute('data-type')==='num';
    var rows=Array.prototype.slice.call(tbody.rows);
    rows.sort(function(a,b){
      var x=val(a,i,num), y=val(b,i,num);
      if(x===null&&y===null){return 0;} if(x===null){return 1;} if(y===null){return -1;}
      return x<y?-dir:(x>y?dir:0);
    });
    for(var k=0;k<rows.length;k++){tbody.appendChild(rows[k]);}
    th.setAttribute('aria-sort',dir>0?'ascending':'descending');
    state.sort=key;state.dir=dir;
  }
  function filter(f){
    var n=0;
    for(var k=0;k<tbody.rows.length;k++){
      var tr=tbody.rows[k], show=(f==='all'||tr.getAttribute('data-status')===f);
      tr.hidden=!show; if(show){n++;}
    }
    for(var b=0;b<buttons.length;b++){
      buttons[b].className=buttons[b].getAttribute('data-filter')===f?'on':'';
    }
    if(count){count.textContent=n+' of '+tbody.rows.length+' rows shown';}
    state.filter=f;
  }
  function remember(){
    var h='filter='+state.filter;
    if(state.sort){h+='&sort='+state.sort+'&dir='+(state.dir>0?'asc':'desc');}
    try{history.replaceState(null,'','#'+h);}catch(e){}
  }
  for(var j=0;j<heads.length;j++){
    if(!heads[j].getAttribute('data-type')){continue;}
    heads[j].addEventListener('click',function(){
      var key=this.getAttribute('data-key');
      var dir=state.sort===key?-state.dir:(this.getAttribute('data-type')==='num'?-1:1);
      sortBy(key,dir);remember();
    });
  }
  for(var b=0;b<buttons.length;b++){
    buttons[b].addEventListener('click',function(){filter(this.getAttribute('data-filter'));remember();});
  }
  var want={};
  location.hash.replace(/^#/,'').split('&').forEach(function(p){
    var kv=p.split('=');if(kv.length===2){want[kv[0]]=decodeURIComponent(kv[1]);}
  });
  if(want.sort){sortBy(want.sort,want.dir==='asc'?1:-1);}
  else{var d=table.getAttribute('data-sorted');if(d){
    for(var j2=0;j2<heads.length;j2++){if(heads[j2].getAttribute('data-key')===d){
      heads[j2].setAttribute('aria-sort','descending');}}state.sort=d;}}
  filter(want.filter||'all');
  document.body.setAttribute('data-ready','1');
})();
"""

_COLUMNS = [
    ("index", "#", "num", "position of the input in the run"),
    ("overlay", "Picture", None, "the overlay; click for the full picture"),
    ("input", "Input", "text", "the input path as listed"),
    (
        "verdict",
        "Verdict",
        "text",
        "NG: the image is defective (a region, or the record's label); then its severity "
        "when the run had severity rules",
    ),
    ("score", "Score", "num", "image score: the record's score, else the map's max over the ROI"),
    ("regions", "Regions", "num", "defect regions reported"),
    ("worst", "Worst region", "num", "highest region score (max of the map in the region)"),
    ("area", "Area (px)", "num", "total area of the regions, in anomaly-map pixels"),
]


def _row_html(row: Dict[str, Any], thumb: bool) -> str:
    st = row["status"]
    cells = [f"<td class='num' data-v='{row['index']}'>{row['index']}</td>"]
    ov = row.get("overlay")
    if ov and thumb:
        cells.append(
            f"<td><a href='{_href(ov)}'><img src='{_href(ov)}' loading='lazy' "
            f"alt='overlay of {html.escape(row['input'], quote=True)}'></a></td>"
        )
    elif ov:
        cells.append(f"<td><a href='{_href(ov)}'>open</a></td>")
    else:
        cells.append("<td class='muted'>-</td>")
    extra = ""
    if st == "ERROR":
        extra = (
            f"<div class='regions'>{html.escape(row['error_type'])}: "
            f"{html.escape(row['message'][:300])}</div>"
        )
    elif row.get("regions"):
        parts = []
        for i, (s, a, b, sev) in enumerate(row["regions"], start=1):
            name = f"{html.escape(str(sev))} " if isinstance(sev, str) else ""
            parts.append(
                f"{i}: {name}{html.escape(_fmt(s))}, {html.escape(str(a))} px at "
                f"{html.escape(json.dumps(b))}"
            )
        if row["n_regions"] > len(row["regions"]):
            parts.append(f"and {row['n_regions'] - len(row['regions'])} more")
        extra = "<div class='regions'>" + "; ".join(parts) + "</div>"
    if row.get("mask"):
        extra += f"<div class='regions'><a href='{_href(row['mask'])}'>mask</a></div>"
    cells.append(f"<td class='path'>{html.escape(row['input'])}{extra}</td>")
    sev = row.get("severity")
    sev_html = f" <span class='muted'>{html.escape(sev)}</span>" if isinstance(sev, str) else ""
    cells.append(
        f"<td data-v='{_PRIORITY[st]}{st}'><span class='badge {st}'>{st}</span>{sev_html}</td>"
    )
    for key in ("score", "n_regions", "worst", "area"):
        v = row.get(key)
        if v is None:
            cells.append("<td class='num' data-v=''></td>")
        else:
            text = _fmt(v) if isinstance(v, float) else str(v)
            cells.append(f"<td class='num' data-v='{v!r}'>{html.escape(text)}</td>")
    return f"<tr data-status='{st}'>" + "".join(cells) + "</tr>"


def write_report(
    out_dir: str,
    *,
    title: Optional[str] = None,
    max_rows: int = 5000,
    max_thumbnails: int = 1000,
) -> str:
    """Write ``out_dir/report.html`` for the run whose ``results.jsonl`` is in ``out_dir``.

    Args:
        out_dir: the run's output folder (holds ``results.jsonl``; ``overlays/``,
            ``masks/`` and ``manifest.json`` are used when present).
        title: the page title (default: ``"torchdefects report: <folder name>"``).
        max_rows: table rows at most; a larger run keeps the NG rows first, then errors,
            then OK, by score, and says so (the counts cover every record).
        max_thumbnails: rows (in table order) that show their overlay as a thumbnail;
            the rest link to it.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: ``out_dir`` has no ``results.jsonl``.
        ValueError: ``max_rows`` or ``max_thumbnails`` is not a positive integer.

    Example:
        >>> import tempfile, json, os
        >>> out = tempfile.mkdtemp()
        >>> with open(os.path.join(out, "results.jsonl"), "w") as f:
        ...     _ = f.write(json.dumps({"input": "a.npy", "error": {"type": "unreadable",
        ...                                                      "message": "bad"}}) + "\\n")
        >>> os.path.basename(write_report(out))
        'report.html'
    """
    for name, v in (("max_rows", max_rows), ("max_thumbnails", max_thumbnails)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "max_rows" and v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    out_dir = os.fspath(out_dir)
    results = os.path.join(out_dir, "results.jsonl")
    if not os.path.isfile(results):
        raise FileNotFoundError(f"out_dir has no results.jsonl: {results}")
    notes: List[str] = []

    manifest: Optional[Any] = None
    mpath = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"manifest.json could not be read: {type(e).__name__}: {e}")

    index = _overlay_index(out_dir)
    counts = {"NG": 0, "OK": 0, "ERROR": 0}
    n = 0
    n_regions = 0
    error_types: Dict[str, int] = {}
    thresholds: Dict[float, int] = {}
    provenance: Any = None
    heap: List[Tuple[Tuple[int, float, int], int, Dict[str, Any]]] = []
    errors: List[Dict[str, Any]] = []
    for lineno, rec in _stream(results, notes):
        row = _row(out_dir, lineno, rec, index)
        n += 1
        counts[row["status"]] += 1
        if row["status"] == "ERROR":
            error_types[row["error_type"]] = error_types.get(row["error_type"], 0) + 1
            if len(errors) < max_rows:
                errors.append(row)
        else:
            n_regions += row["n_regions"]
            thr = row.get("threshold")
            if thr is not None and (thr in thresholds or len(thresholds) < 50):
                thresholds[thr] = thresholds.get(thr, 0) + 1
            if provenance is None and isinstance(rec, dict):
                provenance = rec["defects"].get("pixel_threshold_provenance")
        item = (_key(row), n, row)
        if len(heap) < max_rows:
            heapq.heappush(heap, item)
        else:
            heapq.heappushpop(heap, item)
    # Worst first: NG by score, then errors, then OK by score; ties in input order.
    rows = [r for _, _, r in heap]
    rows.sort(key=lambda r: (-_key(r)[0], -_key(r)[1], r["index"]))
    if n > len(rows):
        notes.append(
            f"the table holds {len(rows)} of {n} records (the NG ones first, then errors, "
            f"then OK, by score); the counts above cover all {n}."
        )
    if counts["ERROR"] > len(errors):
        notes.append(f"{len(errors)} of {counts['ERROR']} error records are listed.")

    folder = os.path.basename(os.path.abspath(out_dir)) or out_dir
    title = title or f"torchdefects report: {folder}"
    try:
        from torchdefects import __version__ as version
    except Exception:  # pragma: no cover - a broken install still gets its report
        version = "unknown"

    if not thresholds:
        thr_text = "n/a (no successful record)"
    elif len(thresholds) == 1:
        thr_text = _fmt(next(iter(thresholds)), 6)
    else:
        thr_text = f"varies: {_fmt(min(thresholds), 6)} .. {_fmt(max(thresholds), 6)}"

    parts: List[str] = []
    parts.append(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
    )
    parts.append(
        f"<header><h1>{html.escape(title)}</h1><div class='sub'>"
        f"{html.escape(os.path.abspath(out_dir))} &middot; torchdefects {html.escape(version)}"
        "</div></header><main>"
    )
    cards = [
        ("inputs", n, ""),
        ("NG (defective)", counts["NG"], "ng"),
        ("OK", counts["OK"], "ok"),
        ("errors", counts["ERROR"], "err"),
        ("regions", n_regions, ""),
    ]
    parts.append("<div class='cards' id='summary'>")
    for label, value, cls in cards:
        parts.append(
            f"<div class='card {cls}'><div class='n'>{value}</div>"
            f"<div class='l'>{html.escape(label)}</div></div>"
        )
    parts.append(
        f"<div class='card'><div class='n'>{html.escape(thr_text)}</div>"
        "<div class='l'>pixel threshold</div></div></div>"
    )
    for note in notes:
        parts.append(f"<div class='note'>{html.escape(note)}</div>")

    parts.append("<div class='grid'><section id='threshold'><h2>Threshold</h2>")
    parts.append(
        f"<p><b>{html.escape(thr_text)}</b> &mdash; {html.escape(_provenance_line(provenance))}</p>"
    )
    normal = _normal_pixels_line(provenance)
    if normal:
        parts.append(f"<p>{html.escape(normal)}</p>")
    parts.append(
        "<p class='muted'>A map pixel at or above the threshold is foreground; regions are "
        "what remains after the run's morphology and filters. In the overlays the threshold "
        "is the middle tick of the colour bar: dark below it, warm at and above it.</p>"
    )
    if provenance is not None:
        parts.append(
            "<details><summary>provenance (every field)</summary>"
            + _kv_table(_flatten(provenance))
            + "</details>"
        )
    parts.append("</section><section id='settings'><h2>Settings</h2>")
    if isinstance(manifest, dict):
        settings = None
        for key in ("settings", "effective_settings", "options", "config"):
            if isinstance(manifest.get(key), dict):
                settings = manifest[key]
                break
        parts.append(_kv_table(_flatten(settings if settings is not None else manifest)))
        if settings is not None:
            parts.append(
                "<details><summary>the whole manifest.json</summary>"
                + _kv_table(_flatten(manifest))
                + "</details>"
            )
    elif manifest is not None:
        parts.append(_kv_table(_flatten(manifest)))
    else:
        parts.append("<p class='muted'>no manifest.json in this folder: settings not recorded.</p>")
    if error_types:
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(error_types.items()))
        parts.append(f"<p>Errors by type: {html.escape(summary)}</p>")
    parts.append("</section></div>")

    parts.append("<section id='inputs'><h2>Inputs</h2><div class='controls'>")
    for f, label in (("all", "All"), ("NG", "NG only"), ("ERROR", "Errors"), ("OK", "OK")):
        parts.append(f"<button type='button' data-filter='{f}'>{label}</button>")
    parts.append(
        "<span class='muted' id='shown'></span><span class='muted'>&middot; click a header "
        "to sort</span></div>"
    )
    parts.append("<table class='results' id='results' data-sorted='score'><thead><tr>")
    for key, label, typ, tip in _COLUMNS:
        t = f" data-type='{typ}'" if typ else ""
        parts.append(f"<th data-key='{key}'{t} title='{html.escape(tip, quote=True)}'>{label}</th>")
    parts.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        parts.append(_row_html(row, thumb=i < max_thumbnails))
    parts.append("</tbody></table>")
    if not rows:
        parts.append("<p class='muted'>results.jsonl holds no record.</p>")
    parts.append("</section>")

    parts.append("<section id='errors'><h2>Errors</h2>")
    if errors:
        parts.append("<ul class='errors'>")
        for e in errors:
            parts.append(
                f"<li><code>{html.escape(e['input'])}</code> &mdash; "
                f"<b>{html.escape(e['error_type'])}</b>: {html.escape(e['message'])}</li>"
            )
        parts.append("</ul>")
    else:
        parts.append("<p class='muted'>no error record.</p>")
    parts.append("</section></main>")
    parts.append(f"<script>{_JS}</script></body></html>\n")

    from torchdefects.files import atomic_write_text

    path = os.path.join(out_dir, "report.html")
    atomic_write_text(path, "".join(parts))
    return path
