"""The evaluation engine: batches outside, perturbations inside, one executor interface.

Inputs are materialized once as tensors: one tensor, or a dict of named tensors passed as keyword
arguments (`inputs`). For each batch the executor runs the unmodified model once (`start_batch`),
then every perturbation (`run_many`), returning the model's raw outputs; an output adapter
(`outputs`) turns each into the rows that measures compare (samples, or tokens of a language
model), and the measures of each perturbation are accumulated against the unmodified outputs of
the same batch. An executor decides *how* a
probed model runs on a batch; the plain `FullForward` runs the whole model with the parameters
substituted (the reference), `executors.IncrementalExecutor` recomputes only what each
perturbation changes, from values kept during the unmodified run (told in advance by `prepare`)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.inputs import Inputs, as_inputs, call_model, describe, nbytes, num_samples, take, to_device, token_ids
from ..errors import LayercritError, check_int
from .executors.base import EXECUTORS, Executor, eval_mode, first_line
from .measures import MeasureSums, Reference
from .outputs import OutputAdapter, resolve_output


@dataclass
class Perturbation:
    """One evaluation of the model with some parameters replaced.

    Attributes:
        key: identifies the result (e.g. (unit, probe, trial)).
        values: new values of the changed parameters, by full parameter name, or a callable
            returning them (materialized only when its chunk runs, see `Engine.evaluate`).
    """

    key: Hashable
    values: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]

    def materialize(self) -> Mapping[str, torch.Tensor]:
        return self.values() if callable(self.values) else self.values


def _nbytes(values: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in values.values())


_AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_autocast(value: object) -> None:
    if value not in _AUTOCAST:
        raise LayercritError(f"Expected `autocast` to be None, 'bf16' or 'fp16', got {value!r}")


def autocast_dtype(autocast: str | None, device: str | torch.device) -> torch.dtype | None:
    """The dtype the model's forward runs in under `autocast` ("bf16", "fp16" or None) on `device`:
    bf16/fp16 on CUDA, None (no autocast, results unchanged) anywhere else."""
    _check_autocast(autocast)
    return _AUTOCAST[autocast] if torch.device(device).type == "cuda" else None


def fits_resident(size: int, free: int, fraction: float) -> bool:
    """Whether inputs of `size` bytes stay on the device once: they take at most `fraction` of its
    `free` bytes (else they are moved batch by batch)."""
    return size <= fraction * free


@dataclass
class RunSettings:
    """How evaluations run (the `Engine` arguments); analysis configs extend it. Changes speed and
    memory, not results (except `autocast`, on CUDA)."""

    batch_size: int = 256
    device: str | None = None  # default: the model's device
    executor: str = "auto"  # see EXECUTORS: incremental when the model traces with torch.fx, else the full forward
    memory_budget: int | None = None  # bytes kept per batch by the incremental executor (None: 1 GiB)
    batch_trials: bool | None = None  # vmap the draws of one layer together (None: on CUDA)
    autocast: str | None = None  # "bf16"/"fp16": CUDA autocast, measures in fp32; ignored off CUDA
    compile: bool | str = False  # torch.compile what the executor runs (a string: that backend)

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size)
        if self.executor not in EXECUTORS:
            raise LayercritError(f"Expected `executor` to be one of {', '.join(EXECUTORS.list())}, got {self.executor!r}")
        if self.memory_budget is not None:
            check_int("memory_budget", self.memory_budget, expected="a positive number of bytes")
        _check_autocast(self.autocast)
        if not isinstance(self.compile, (bool, str)):
            raise LayercritError(f"Expected `compile` to be true, false or a torch.compile backend name, got {self.compile!r}")


class Engine:
    """Evaluates perturbations of `model` on fixed inputs.

    Args:
        model: the model (left unchanged; evaluated in eval mode).
        inputs: (N, ...) tensor, or a dict of (N, ...) tensors passed as keyword arguments
            (integer dtypes are kept: token ids); materialized once.
        labels: (N,) integer labels, (N, T) token labels (−100: none) or None.
        batch_size: samples per batch.
        device: where to compute (default: the model's device).
        executor: executor name (see `EXECUTORS`; "auto": incremental when the model traces with
            torch.fx, else the full forward) or an `Executor` built for `model`.
        progress: show a progress bar.
        measures: which measures to compute (default: all; see `measures.MEASURES`).
        values_budget: bytes of substituted parameter values held at once; more perturbations
            than fit are evaluated in several passes over the data (each pass recomputes the
            unmodified outputs, which are identical).
        autocast: "bf16" or "fp16" to run the model under CUDA autocast (measures stay in fp32 and
            above); ignored off CUDA, where results are unchanged.
        channels_last: feed 4-D batches in channels-last layout (faster convolutions on CUDA and
            with oneDNN on the CPU; the numbers differ only by round-off). None (default): when the
            inputs are 4-D and the model has a `Conv2d`.
        compile: `torch.compile` what the executor runs (any device; compiling takes time); True for
            the default backend (inductor) or a backend name.
        memory_budget: bytes of intermediate values the incremental executor keeps per batch
            (None: its default, `executors.DEFAULT_MEMORY_BUDGET`); larger batches run in sub-batches.
        batch_trials: run the perturbations of one layer together in one vmapped pass (True/False;
            None: automatic, on CUDA only).
        output: the output adapter (a name of `outputs.OUTPUTS`, e.g. "logits", "next-token",
            "hidden:mean", or an `OutputAdapter`); None: chosen from the model's output where that
            is unambiguous (`stats()` says which and why).

    On CUDA, cuDNN autotuning is switched on and the inputs are moved to the device once when they
    take at most `RESIDENT_FRACTION` of its free memory (else batch by batch).
    """

    RESIDENT_FRACTION = 0.25  # share of free CUDA memory the inputs may take to stay on the device
    OUTPUTS_BUDGET = 1 << 30  # bytes of probed outputs asked of a batching executor at once (LM logits are large)

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        labels: torch.Tensor | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        executor: str | Executor = "full",
        progress: bool = False,
        values_budget: int = 2 << 30,
        measures: Sequence[str] | None = None,
        *,
        autocast: str | None = None,
        channels_last: bool | None = None,
        compile: bool | str = False,
        memory_budget: int | None = None,
        batch_trials: bool | None = None,
        output: str | OutputAdapter | None = None,
    ) -> None:
        check_int("batch_size", batch_size)
        inputs = as_inputs(inputs)
        if num_samples(inputs) == 0:
            raise LayercritError("no evaluation samples")
        _check_autocast(autocast)
        self.model = model
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        if first is not None and first.device != self.device:
            model.to(self.device)
        cuda = self.device.type == "cuda"
        self.autocast = autocast_dtype(autocast, self.device)
        if channels_last is None:
            channels_last = (isinstance(inputs, torch.Tensor) and inputs.ndim == 4
                             and any(isinstance(m, nn.Conv2d) for m in model.modules()))
        self.channels_last = bool(channels_last)
        if cuda:
            torch.backends.cudnn.benchmark = True  # every batch has the same shapes: let cuDNN pick its fastest kernels
            inputs, labels = self._resident(inputs, labels)
        self.inputs, self.labels = inputs, labels
        self.batch_size = batch_size
        self.output_spec = output
        self.output: OutputAdapter | None = None  # set by the check below
        self.output_choice = ""
        self.num_outputs = self._check_inputs()  # before the executor: bad data fails before any tracing or logging
        if isinstance(executor, Executor):
            self.executor = executor
        else:
            options = {"compile": compile} if compile else {}
            if executor != "full":
                options |= {k: v for k, v in (("memory_budget", memory_budget), ("batch_trials", batch_trials)) if v is not None}
            self.executor = EXECUTORS.get(executor)(model, **options)
        self.progress = progress
        self.values_budget = values_budget
        self.measures = measures

    @classmethod
    def from_config(cls, model: nn.Module, inputs: Inputs, labels: torch.Tensor | None, config,
                    progress: bool = False, measures: Sequence[str] | None = None) -> Engine:
        """An engine with the run settings of `config` (a settings dataclass with the fields of
        `RunSettings`, e.g. `MeasureConfig`, whose `output` names the output adapter)."""
        return cls(model, inputs, labels, config.batch_size, config.device, config.executor, progress,
                   measures=measures, autocast=config.autocast, compile=config.compile,
                   memory_budget=config.memory_budget, batch_trials=config.batch_trials,
                   output=getattr(config, "output", None))

    def stats(self) -> dict:
        """How the last evaluations ran: the executor used and why (`executor_reason`: the fallback
        reason when "auto" fell back to the full forward), the most bytes of kept values at once (only
        for an executor that keeps values), and the output adapter with how it was chosen."""
        ex = self.executor
        reason = getattr(ex, "fallback_reason", None)
        ran = getattr(ex, "_full", None) or ex  # what "auto" fell back to, if it did
        if getattr(ran, "fallback_reason", None):  # the prefix executor's own fallback to the full forward
            reason, ran = f"{reason}; {ran.fallback_reason}" if reason else ran.fallback_reason, ran._full
        used = {"executor_used": ran.name,
                "executor_reason": reason or getattr(ex, "reason", "") or "requested"}
        if ran.name != "full" and hasattr(ran, "peak_bytes"):
            used["kept_peak_bytes"] = ran.peak_bytes
        if getattr(ran, "concat_used", None) is not None:
            used["batch_trials_used"] = ran.concat_used
        return used | {"output": self.output.name, "output_choice": self.output_choice}

    def _resident(self, inputs: Inputs, labels: torch.Tensor | None) -> tuple[Inputs, torch.Tensor | None]:
        """The inputs (and labels) on the CUDA device if they fit its share of free memory, else as given."""
        size = nbytes(inputs) + (0 if labels is None else labels.numel() * labels.element_size())
        free, _ = torch.cuda.mem_get_info(self.device)
        if not fits_resident(size, free, self.RESIDENT_FRACTION):
            return inputs, labels
        return to_device(inputs, self.device), None if labels is None else labels.to(self.device)

    def _check_inputs(self) -> int:
        """Check the data against the model on two samples (all of them for token ids) and pick the
        output adapter; return the width of the compared rows (classes, vocabulary or features)."""
        self._check_tokens()
        x = to_device(take(self.inputs, slice(0, 2)), self.device)
        try:
            with torch.no_grad(), eval_mode(self.model):
                out = call_model(self.model, x)
        except LayercritError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            what = f"of shape {tuple(x.shape[1:])}" if isinstance(x, torch.Tensor) else describe(x)
            raise LayercritError(f"the model cannot take inputs {what} (per sample): {first_line(e)}") from None
        self.output, self.output_choice = resolve_output(self.output_spec, self.model, out)
        return self.output.check(x, self.labels, out)

    def _check_tokens(self) -> None:
        """Token ids inside the model's vocabulary and sequences no longer than its context, over all
        inputs (out-of-range ids fail deep inside the model, or worse, index another row on CUDA)."""
        ids = token_ids(self.inputs)
        if ids is None or ids.numel() == 0:
            return
        embedding = _input_embedding(self.model)
        if embedding is not None:
            lo, hi, rows = int(ids.min()), int(ids.max()), embedding.num_embeddings
            if lo < 0 or hi >= rows:
                raise LayercritError(
                    f"token ids range over {lo}..{hi} but the model's input embedding has {rows} rows (ids 0..{rows - 1}); "
                    "tokenize the data with the model's own tokenizer"
                )
        context = _context_length(self.model)
        if context is not None and ids.ndim >= 2 and ids.shape[1] > context[0]:
            raise LayercritError(
                f"sequences of {ids.shape[1]} tokens are longer than the model's context of {context[0]} positions "
                f"({context[1]}); use a smaller --seq-len"
            )

    def batches(self, samples: slice | None = None) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
        """The batches of all samples, or of `samples`: batch k starts at `samples.start + k · batch_size`
        (a start at a multiple of the batch size gives the same batches as a pass over all samples)."""
        n = num_samples(self.inputs)
        start, stop, _ = (samples or slice(None)).indices(n)
        for i in range(start, stop, self.batch_size):
            j = min(i + self.batch_size, stop)
            x = to_device(take(self.inputs, slice(i, j), n), self.device, non_blocking=True)
            if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = None if self.labels is None else self.labels[i:j].to(self.device)
            yield x, y

    def _chunks(self, perturbations: Sequence[Perturbation]) -> Iterator[list[tuple[Hashable, Mapping[str, torch.Tensor]]]]:
        chunk, size = [], 0
        for pt in perturbations:
            values = pt.materialize()
            n = _nbytes(values)
            if chunk and size + n > self.values_budget:
                yield chunk
                chunk, size = [], 0
            chunk.append((pt.key, values))
            size += n
        if chunk or not perturbations:  # no perturbations: one pass still measures the model itself
            yield chunk

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()

    def evaluate(
        self, perturbations: Sequence[Perturbation], desc: str = "probes", *, samples: slice | None = None,
        sums: dict[Hashable, MeasureSums] | None = None, base_sums: MeasureSums | None = None,
        keep_samples: Sequence[str] = (),
    ) -> tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
        """Measures of the unmodified model and of each perturbation, as means over all samples.

        Perturbations run in chunks that fit `values_budget`; within a chunk the loop is over
        batches outside and perturbations inside.

        Args:
            perturbations: what to evaluate.
            desc: the progress bar's label.
            samples: evaluate these samples only (e.g. the next images of adaptive sampling).
            sums: accumulators by perturbation key, continued (and filled in) here: the means
                returned are over every sample they have seen, summed batch by batch in order, as
                one pass over all those samples would sum them.
            base_sums: the unmodified model's accumulator, continued likewise.
            keep_samples: measures whose per-sample values are kept, appended per batch to each
                accumulator's `samples[measure]` (a sample's mean over its rows, e.g. its tokens).
        """
        start, stop, _ = (samples or slice(None)).indices(num_samples(self.inputs))
        n_batches = -(-max(0, stop - start) // self.batch_size)
        if self.device.type == "cpu":
            _keep_freed_memory()
        out: dict[Hashable, dict[str, float]] = {}
        base_result = None
        bar = tqdm(total=n_batches * len(perturbations), desc=desc, unit="fwd", disable=not self.progress, leave=False)
        try:
            with torch.no_grad(), eval_mode(self.model):
                for i, chunk in enumerate(self._chunks(perturbations)):
                    base = base_sums if base_sums is not None and i == 0 else MeasureSums()
                    accs = [MeasureSums() if sums is None else sums.setdefault(key, MeasureSums()) for key, _ in chunk]
                    self.executor.prepare([values for _, values in chunk])
                    for x, y in self.batches(samples):
                        try:
                            with self._autocast():
                                p_out = self.executor.start_batch(x)
                            rows = self.output.rows(x, y, p_out)
                            reference = self._reference(self.output.values(p_out, rows), rows)  # once per batch
                            base.update(reference.unmodified())
                            for acc, q_out in zip(accs, self._outputs([values for _, values in chunk], p_out)):
                                q = self.output.values(q_out, rows)
                                measured = reference.compare(q)
                                acc.update(measured)
                                for k in keep_samples:  # adaptive sampling's per-image statistics
                                    acc.samples.setdefault(k, []).append(_per_sample(measured[k], rows, x, len(q)))
                                del q_out, q
                                bar.update(1)
                        finally:
                            self.executor.end_batch()
                    base_result = base_result or base.compute()
                    out.update({key: acc.compute() for (key, _), acc in zip(chunk, accs)})
        finally:
            bar.close()
        return base_result, out

    def _outputs(self, perturbations: list[Mapping[str, torch.Tensor]], like: object) -> Iterator[object]:
        """The raw outputs of `perturbations` on the current batch, one at a time: an executor that
        runs them one by one is asked for each only when the previous one has been measured, one
        that batches them (`run_many`) for as many as `OUTPUTS_BUDGET` holds (outputs the size of
        `like`): a language model's (B, T, V) logits are not held once per perturbation."""
        ex = self.executor
        if type(ex).run_many is Executor.run_many or not getattr(ex, "batches_outputs", True):
            for values in perturbations:
                with self._autocast():
                    q = ex.run(values)
                yield q
                del q  # before the next run: two outputs at once at most
            return
        step = max(1, self.OUTPUTS_BUDGET // max(1, _tensor_bytes(like)))
        for i in range(0, len(perturbations), step):
            with self._autocast():
                outs = ex.run_many(perturbations[i : i + step])
            outs.reverse()
            while outs:
                yield outs.pop()

    def _reference(self, p: torch.Tensor, rows) -> Reference:
        """The unmodified outputs of a batch, prepared once for the measures of every probe (outside
        autocast, whatever precision the model ran in; see `measures.Reference`)."""
        return Reference(p, rows.labels, self.measures, softmax=self.output.softmax, rows=rows.index)


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse (once per process; Linux with glibc only).

    Every probe allocates and frees the activations of the blocks it runs, tens of MB a batch. With
    glibc's defaults, freed memory at the top of the heap beyond a threshold is returned to the
    system and the next probe faults it in again, page by page: measured on the prefix executor
    (GPT-2, 8 blocks, vocabulary 512, one thread), 1.3 M minor page faults and 20 % of the CPU time
    in the kernel; the full forward, whose probes all allocate alike, varies between none and as
    many. Raising the trim threshold to 1 GiB (and the mmap threshold to glibc's 32 MiB maximum of
    its own adaptive setting) keeps that memory in the process instead. `LAYERCRIT_MALLOC=default`
    leaves glibc's settings alone.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if os.environ.get("LAYERCRIT_MALLOC") == "default" or platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(ctypes.c_int(-3), ctypes.c_int(32 << 20))  # M_MMAP_THRESHOLD
    mallopt(ctypes.c_int(-1), ctypes.c_int(1 << 30))  # M_TRIM_THRESHOLD


def _tensor_bytes(out: object) -> int:
    """Bytes of the tensors in a model output (nested tuples, dicts, `ModelOutput`s)."""
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return sum(_tensor_bytes(v) for v in values)


def _per_sample(v: torch.Tensor, rows, x: Inputs, n_rows: int) -> torch.Tensor:
    """Per-row values `v` of one batch as per-sample means (on the CPU): a sample's rows are its
    positions of the flattened output (one row per sample for logits; its tokens for next-token)."""
    b = num_samples(x)
    if rows.index is None and len(v) == b:
        return v.detach().cpu()
    index = rows.index if rows.index is not None else torch.arange(len(v), device=v.device)
    sample = index.to(v.device) // max(1, n_rows // b)
    ok = ~v.isnan()
    total = torch.zeros(b, dtype=torch.float64, device=v.device).index_add_(0, sample[ok], v[ok].double())
    count = torch.zeros(b, dtype=torch.float64, device=v.device).index_add_(0, sample[ok], torch.ones_like(v[ok], dtype=torch.float64))
    return (total / count).cpu()  # NaN: a sample without finite rows


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The token embedding: `get_input_embeddings()` of a Hugging Face model, else the model's only
    `nn.Embedding` (none is guessed among several)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return found[0] if len(found) == 1 else None


def _context_length(model: nn.Module) -> tuple[int, str] | None:
    """The most positions the model takes, from its (Hugging Face) config, and where that was read."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "max_seq_len"):  # GPT-2 aliases the second to the first
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"config.{attr}"
    return None
