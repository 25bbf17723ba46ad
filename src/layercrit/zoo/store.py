"""The results store: one SQLite file, schema versioned, safe to share between sweeps.

Schema (version 2):

- `meta(key, value)`: `schema_version`.
- `runs(run_id, started, finished, layercrit_version, torch_version, host, zoo, config)`: one row
  per sweep invocation; `config` is the resolved zoo (JSON).
- `models(model, category, metadata, spec, weights, config, data, data_identity, n, updated)`: one row
  per model id; `metadata` is the zoo entry's free metadata (JSON), `config` its resolved settings.
- `results(model, layer, probe, target, trial, config_hash, shift, label, seed, n, n_params, criticality,
  accuracy, top5, accuracy_drop, agreement, l1, l2, kl, loss, precision, trials_used, half_width, extra,
  data_identity, run_id, created)`: one row per unit (model, layer, probe/target, trial, shift) under
  one configuration (`config_hash`: data identity, seeds, probe settings, weights, adaptive settings),
  primary key over those. The unmodified model is the unit with layer `(unmodified)` and probe
  `none`; `shift` is `none` for the clean data (else a corruption, `layercrit.shifts`). Under
  adaptive sampling (`layercrit.adaptive`) `n` is the images the unit used, `trials_used` its trials,
  `half_width` its 95 % half-width and `precision` the target; NULL otherwise.
- `rounds(model, layer, probe, target, shift, config_hash, state, run_id, updated)`: adaptive
  sampling's statistics of a unit whose rounds are under way (exact sums, JSON), written after each
  round; a resumed sweep continues from them, and they are deleted when the unit's rows are stored.

Version 1 stores (no `shift`, no adaptive columns, no `rounds`) are migrated when opened: their rows
keep every value, with shift `none`.

Every work item's rows are committed in one transaction as soon as it finishes (WAL journal,
`INSERT OR IGNORE`): a killed sweep loses only items in flight, a re-run adds only what is
missing, and two sweeps writing at once neither duplicate nor corrupt anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pandas as pd

from .._utils.io import make_output_dir
from ..errors import LayercritError
from ..results import ADAPTIVE_COLUMNS as _ROW_ADAPTIVE
from ..results import CLEAN

__all__ = ["SCHEMA_VERSION", "Store"]

SCHEMA_VERSION = 2
MEASURE_COLUMNS = ["criticality", "accuracy", "top5", "accuracy_drop", "agreement", "l1", "l2", "kl", "loss"]
ADAPTIVE_COLUMNS = ["precision", *_ROW_ADAPTIVE]  # adaptive sampling (layercrit.adaptive); NULL otherwise
KEY_COLUMNS = ["model", "layer", "probe", "target", "trial", "config_hash", "shift"]
RESULT_COLUMNS = KEY_COLUMNS + ["label", "seed", "n", "n_params", *MEASURE_COLUMNS, *ADAPTIVE_COLUMNS, "extra",
                                "data_identity", "run_id", "created"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, finished REAL,
    layercrit_version TEXT, torch_version TEXT, host TEXT, zoo TEXT, config TEXT);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY, category TEXT, metadata TEXT, spec TEXT, weights TEXT, config TEXT,
    data TEXT, data_identity TEXT, n INTEGER, updated REAL);
CREATE TABLE IF NOT EXISTS results ({results});
CREATE INDEX IF NOT EXISTS results_model ON results (model, probe);
CREATE TABLE IF NOT EXISTS rounds (
    model TEXT NOT NULL, layer TEXT NOT NULL, probe TEXT NOT NULL, target TEXT NOT NULL, shift TEXT NOT NULL,
    config_hash TEXT NOT NULL, state TEXT NOT NULL, run_id INTEGER, updated REAL,
    PRIMARY KEY (model, layer, probe, target, shift, config_hash));
"""
_RESULTS = f"""
    model TEXT NOT NULL, layer TEXT NOT NULL, probe TEXT NOT NULL, target TEXT NOT NULL, trial INTEGER NOT NULL,
    config_hash TEXT NOT NULL, shift TEXT NOT NULL DEFAULT '{CLEAN}', label TEXT, seed INTEGER, n INTEGER, n_params INTEGER,
    {", ".join(f"{m} REAL" for m in MEASURE_COLUMNS)}, precision REAL, trials_used INTEGER, half_width REAL,
    extra TEXT, data_identity TEXT, run_id INTEGER, created REAL,
    PRIMARY KEY ({", ".join(KEY_COLUMNS)})"""
_SCHEMA = _SCHEMA.replace("{results}", _RESULTS)


def _clean(v):
    """SQLite-ready scalar: NaN/NA become NULL, numpy scalars plain Python."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return v


class Store:
    """A results store in one SQLite file (created on first use).

    Args:
        path: the `.sqlite`/`.db` file.
        create: create the file when missing (False: a missing file is an error).
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise LayercritError(f"results store {str(self.path)!r} does not exist")
            make_output_dir(self.path.parent)  # created with its parents, as every output folder
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # explicit transactions
            self.db.execute("PRAGMA busy_timeout = 60000")
            self.db.execute("PRAGMA journal_mode = WAL")
            with self.transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would COMMIT mid-transaction
                    self.db.execute(statement)
                row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) == 1:
                    self._migrate_v1()
                elif int(row[0]) != SCHEMA_VERSION:
                    raise LayercritError(
                        f"results store {str(self.path)!r} has schema version {row[0]}; this layercrit reads {SCHEMA_VERSION}"
                    )
        except sqlite3.DatabaseError as e:
            raise LayercritError(f"{str(self.path)!r} is not a usable SQLite results store: {e}") from None

    def _migrate_v1(self) -> None:
        """Version 1 → 2 (inside the opening transaction): `results` gains `shift` (in its key) and the
        adaptive columns; SQLite cannot change a primary key in place, so the table is rebuilt."""
        old = [r[1] for r in self.db.execute("PRAGMA table_info(results)")]
        self.db.execute("ALTER TABLE results RENAME TO results_v1")
        self.db.execute(f"CREATE TABLE results ({_RESULTS})")
        cols = ", ".join(c for c in old if c in RESULT_COLUMNS)
        self.db.execute(f"INSERT INTO results ({cols}) SELECT {cols} FROM results_v1")
        self.db.execute("DROP TABLE results_v1")  # and its index
        self.db.execute("CREATE INDEX IF NOT EXISTS results_model ON results (model, probe)")
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error): writers queue instead of failing.

        A write the disk refuses (full, read-only, I/O error) becomes one `LayercritError` naming the
        store: the transaction is rolled back, results committed before it are kept.
        """
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (disk full)
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if not any(w in str(e) for w in ("disk", "readonly", "read-only", "I/O")):
                raise
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise LayercritError(f"could not write results store {str(self.path)!r} ({e}); this batch of results "
                                 f"was not written, those written before are kept") from None

    # -- writing -------------------------------------------------------------------------------

    def start_run(self, zoo: str, config: Mapping) -> int:
        import torch

        from .._version import __version__

        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO runs (started, layercrit_version, torch_version, host, zoo, config) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), __version__, torch.__version__, platform.node(), zoo, json.dumps(config, default=str)),
            )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int) -> None:
        with self.transaction():
            self.db.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (time.time(), run_id))

    def put_model(self, model: str, category: str | None = None, metadata: Mapping | None = None, **info) -> None:
        """Insert or update a model's description (category, free metadata, spec, data identity, ...)."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO models (model, category, metadata, spec, weights, config, data, data_identity, n, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model) DO UPDATE SET category=excluded.category, "
                "metadata=excluded.metadata, spec=excluded.spec, weights=excluded.weights, config=excluded.config, "
                "data=excluded.data, data_identity=excluded.data_identity, n=excluded.n, updated=excluded.updated",
                (model, category, json.dumps(dict(metadata or {}), default=str), info.get("spec"), info.get("weights"),
                 json.dumps(info.get("config") or {}, default=str), info.get("data"), info.get("data_identity"),
                 info.get("n"), time.time()),
            )

    def add_results(self, rows: Iterable[Mapping], config_hash: str, run_id: int | None = None) -> int:
        """Commit one work item's rows in one transaction; rows already present are kept. Returns rows added."""
        now = time.time()
        values = []
        for r in rows:
            extra = {k: _clean(v) for k, v in r.items() if k not in RESULT_COLUMNS and k != "extra"}
            row = {**{k: r.get(k) for k in RESULT_COLUMNS}, "config_hash": config_hash, "run_id": run_id, "created": now,
                   "target": r.get("target") or "", "shift": r.get("shift") or CLEAN,
                   "extra": json.dumps(extra) if extra else r.get("extra")}
            values.append(tuple(_clean(row[k]) for k in RESULT_COLUMNS))
        units = {(v[0], v[1], v[2], v[3], v[6]) for v in values}  # (model, layer, probe, target, shift)
        with self.transaction():
            before = self.db.total_changes
            self.db.executemany(
                f"INSERT OR IGNORE INTO results ({', '.join(RESULT_COLUMNS)}) VALUES ({', '.join('?' * len(RESULT_COLUMNS))})",
                values,
            )
            added = self.db.total_changes - before
            # a unit's rows are final: its adaptive rounds (if any) are not needed any more
            self.db.executemany("DELETE FROM rounds WHERE model = ? AND layer = ? AND probe = ? AND target = ? "
                                "AND shift = ? AND config_hash = ?", [(*u, config_hash) for u in units])
            return added

    def save_rounds(self, model: str, config_hash: str, shift: str, states: Mapping[tuple[str, str, str], Mapping],
                    run_id: int | None = None) -> None:
        """Keep the adaptive-sampling state of units under way, by (probe, target, layer), in one transaction."""
        now = time.time()
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO rounds (model, layer, probe, target, shift, config_hash, state, run_id, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(model, layer, probe, target or "", shift, config_hash, json.dumps(state), run_id, now)
                 for (probe, target, layer), state in states.items()],
            )

    def load_rounds(self, model: str, config_hash: str, shift: str = CLEAN) -> dict[tuple[str, str, str], dict]:
        """The saved adaptive-sampling states of `model`'s units under way, by (probe, target, layer)."""
        cur = self.db.execute("SELECT probe, target, layer, state FROM rounds WHERE model = ? AND config_hash = ? "
                              "AND shift = ?", (model, config_hash, shift))
        return {(p, t, layer): json.loads(state) for p, t, layer, state in cur.fetchall()}

    # -- reading -------------------------------------------------------------------------------

    def done_units(self, model: str, config_hash: str, shift: str = CLEAN) -> set[tuple[str, str, str, int]]:
        """(layer, probe, target, trial) of the units of `model` already stored under `config_hash` (and `shift`)."""
        cur = self.db.execute("SELECT layer, probe, target, trial FROM results WHERE model = ? AND config_hash = ? "
                              "AND shift = ?", (model, config_hash, shift))
        return {(a, b, c, int(d)) for a, b, c, d in cur.fetchall()}

    def results(self, probe: str | None = None, models: Iterable[str] | None = None) -> pd.DataFrame:
        """Tidy results (one row per unit), optionally of one probe and some models; the values stored
        in `extra` are unpacked into columns."""
        sql, args = "SELECT * FROM results", []
        where = []
        if probe is not None:
            where.append("probe = ?")
            args.append(probe)
        if models is not None:
            models = list(models)
            where.append(f"model IN ({', '.join('?' * len(models))})")
            args += models
        if where:
            sql += " WHERE " + " AND ".join(where)
        df = pd.read_sql_query(sql + " ORDER BY rowid", self.db, params=args)
        for col in MEASURE_COLUMNS + ["precision", "half_width"]:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)  # all-NULL columns come back as objects
        for col in ("seed", "n", "n_params", "trial", "trials_used"):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
        # Values without a column of their own (rel_l2, perplexity, n_nonfinite, note, imported extras)
        # come back as columns, as `measure` returned them.
        extra = pd.DataFrame([json.loads(e) if e else {} for e in df.pop("extra")], index=df.index)
        return pd.concat([df, extra[[c for c in extra.columns if c not in df.columns]]], axis=1)

    def models(self) -> pd.DataFrame:
        """One row per model: `model, category`, the free metadata as columns, and the data identity."""
        df = pd.read_sql_query("SELECT model, category, metadata, spec, weights, data, data_identity, n FROM models "
                               "ORDER BY rowid", self.db)
        meta = pd.DataFrame([json.loads(m or "{}") for m in df.pop("metadata")], index=df.index)
        meta = meta[[c for c in meta.columns if c not in df.columns]]
        return pd.concat([df, meta], axis=1)

    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY run_id", self.db)

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
