"""The top-level verbs: compile a model, run it in a mode, report, export."""
from __future__ import annotations

import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.inputs import as_inputs
from .compiler.approx import DEFAULT_ACTIVATION_BITS, DEFAULT_MARGIN
from .compiler.passes import PassNote
from .compiler.pipeline import CompileResult, compile_graph
from .compiler.ranges import InputRange
from .compiler.targets import check_ops
from .errors import CompileError, InputError, VeilWarning, warn
from .frontend import model_warnings, to_graph
from .ir import Op, ops_for, run as interpret
from .ir.head import START_OPS, Head
from .modes import SERVED, Mode, as_mode
from .wire import fingerprint


@dataclass
class Report:
    """What the compiler did and what it predicts. ``str(report)`` is a readable table."""

    layers: list[dict]
    depth: int
    params: dict
    param_reason: str
    rotations: list[int]
    notes: list[str]
    lanes: int = 1
    costs: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    # HE cost from the structure alone (veil.compiler.estimate): depth, bootstraps,
    # rotation keys and their memory, latency; present for every model.
    estimate: dict = field(default_factory=dict)
    he_error: str = ""     # why mode="he" cannot run this model ("" when it can)
    # which modes suit the model and each one's seconds per input here (veil.advice)
    advice: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "depth": self.depth, "params": self.params,
                "param_reason": self.param_reason, "rotations": self.rotations,
                "notes": self.notes, "lanes": self.lanes, "costs": self.costs,
                "accuracy": self.accuracy, "estimate": self.estimate,
                "he_error": self.he_error, "advice": [a.to_dict() for a in self.advice]}

    def _advice_lines(self) -> list[str]:
        if not self.advice:
            return []
        return (["", "advice (mode, suits, seconds per input on this machine, why):"]
                + [f"  {a.line()}" for a in self.advice]
                + [f"  {a.mode} seconds: {a.basis}" for a in self.advice
                   if a.basis and a.seconds is not None and a.mode in ("he", "mpc")])

    def _estimate_lines(self) -> list[str]:
        e = self.estimate
        if not e:
            return []
        boot = ("none" if e["fits"] else f"{e['bootstraps']} on the longest path "
                f"({e['bootstrap_ciphertexts']} ciphertext bootstraps in all)")
        widest = max((layer["ciphertexts"] for layer in e["layers"]), default=1)
        # with a slot plan, the plan's figures below are what runs; the structural
        # estimate (a packing model, no key sharing) stays for comparison across models
        title = ("HE estimate" if self.he_error or not self.params
                 else "HE structural estimate (the plan's figures below are what runs)")
        return [f"{title}: depth {e['depth']} (at most {e['max_depth']} without "
                f"bootstrapping); bootstraps needed: {boot}",
                f"  ring 2^{e['ring_dim'].bit_length() - 1}, {e['scaling_bits']}-bit scale, "
                f"{e['num_large_digits']} key-switch digits ({e['towers_per_key']} towers "
                "per key)",
                f"  rotation keys: {e['rotation_keys']} x {e['key_bytes'] / 2**20:.0f} MiB = "
                f"{e['keys_bytes'] / 2**30:.2f} GiB",
                f"  ciphertexts: up to {widest} per layer; estimated latency "
                f"{e['latency_s']:.3g} s per input"] + self._calibrated_lines()

    def _calibrated_lines(self) -> list[str]:
        c = self.estimate.get("calibrated")
        if not c:
            return []
        return [f"  calibrated on {c['on']} measured under HE: {c['latency_s']:.3g} s per "
                f"input, {c['rotation_keys']} rotation keys ({c['keys_bytes'] / 2**30:.2f} "
                "GiB) plus the bootstrapping keys"]

    def _cost_lines(self) -> list[str]:
        """Estimated latency and amortised cost per input of both batch layouts."""
        lane_ct = self.costs.get("lanes_per_ciphertext")
        if lane_ct is None:
            return []
        out = [f"estimated cost (rotation units): one ciphertext {lane_ct:g}, i.e. "
               f"{lane_ct / self.lanes:.3g} per input with {self.lanes} lanes"]
        feat = self.costs.get("features_per_batch")
        slots = self.params["ring_dim"] // 2
        out.append(f"feature layout: {feat:g} per batch of {slots}, i.e. "
                   f"{feat / slots:.3g} per input" if feat is not None
                   else "feature layout: not available (a layer is too wide)")
        return out

    def __str__(self) -> str:
        rows = [f"{'layer':<18}{'op':<14}{'input range':<24}{'degree':>7}{'max err':>11}"]
        for r in self.layers:
            rng = f"[{r['input_lo']:.3g}, {r['input_hi']:.3g}]"
            deg = str(r.get("degree", "")) if r.get("degree") else "-"
            err = f"{r['max_abs_error']:.2e}" if "max_abs_error" in r else "-"
            rows.append(f"{r['name'][:17]:<18}{r['op']:<14}{rng:<24}{deg:>7}{err:>11}")
        rows += [""] + self._estimate_lines()
        if self.he_error:
            rows += [f"mode 'he': not available: {self.he_error}"]
            rows += [f"estimate assumption: {a}" for a in self.estimate.get("assumptions", ())]
            rows += [f"note: {n}" for n in self.notes]
            return "\n".join(rows + self._accuracy_lines() + self._advice_lines())
        p = self.params
        rows += [f"multiplicative depth: {self.depth}",
                 f"CKKS: ring {p['ring_dim']}, {p['scaling_bits']}-bit scale, "
                 f"{p['security']}" + (" (INSECURE test parameters)"
                                       if p["insecure_test_params"] else ""),
                 f"why: {self.param_reason}",
                 f"rotation keys: {len(self.rotations)} {self.rotations}",
                 f"inputs per ciphertext (encrypt_batch): {self.lanes}"]
        rows += self._cost_lines()
        rows += [f"estimate assumption: {a}" for a in self.estimate.get("assumptions", ())]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows + self._accuracy_lines() + self._advice_lines())

    def _accuracy_lines(self) -> list[str]:
        if not self.accuracy:
            return []
        return ["predicted accuracy: " + ", ".join(f"{k} {v:.4f}"
                                                   for k, v in self.accuracy.items())]


def _stop_servers(servers: dict) -> None:
    """Stop every mode's local processes (also run at interpreter exit: no orphans)."""
    failed = []
    while servers:
        _, server = servers.popitem()
        try:
            server.close()
        except Exception as exc:           # stop the others first
            failed.append(exc)
    if failed:
        raise failed[0]


class CompiledModel:
    """A model compiled for private inference. Use as a context manager (or call
    :meth:`close`) to free HE keys and stop the processes ``run`` started."""

    def __init__(self, result: CompileResult, input_range: InputRange | tuple[float, float],
                 calibration_ranges: dict[str, tuple[float, float]],
                 text: dict | None = None) -> None:
        self.result = result
        # per-feature bounds of the inputs HE's polynomials are valid on (simulate and
        # the HE client refuse values outside them; ``clip`` clamps into them); a
        # (lo, hi) pair is one range for every feature
        if not isinstance(input_range, InputRange):
            lo, hi = (np.asarray(float(v)) for v in input_range)
            input_range = InputRange(lo, hi, tuple(result.source.input_shape), "model")
        self.input_range = input_range
        self._model_id: tuple[InputRange, str] | None = None
        self._ranges = calibration_ranges
        # a text model's tokenizer (its ``veil_text``): run() takes texts too
        self.text = dict(text) if text else None
        # mode -> its local processes (deploy/local.py); stopped by close(), and by the
        # finalizer when this object is collected or the interpreter exits without it
        self._servers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_servers, self._servers)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.result.source.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """What the server computes per sample (the logits when the model has an output
        head; :attr:`head` turns them into the model's output on the client)."""
        return self.result.source.output_shape

    @property
    def head(self) -> Head:
        """The client's part of the model (:mod:`veil.ir.head`): a final softmax or
        sigmoid, class labels; empty when the server's output is the model's."""
        return self.result.source.head or Head()

    def manifest(self) -> dict:
        """The key manifest plus input layout and calibrated input range (``range``, the
        overall pair, and ``bounds``, per feature: :mod:`veil.compiler.ranges`)."""
        m = self.result.he_plan().manifest()
        m["input"].update(self.input_range.to_manifest())
        return m

    @property
    def model_id(self) -> str:
        """The manifest's fingerprint, computed once per calibrated input range: the
        manifest is built from the immutable compile result plus :attr:`input_range`,
        the one part a caller can replace (hashing it costs milliseconds, and every
        request asks)."""
        cached = self._model_id
        if cached is None or cached[0] is not self.input_range:
            cached = self._model_id = (self.input_range, fingerprint(self.manifest()))
        return cached[1]

    # -- running -----------------------------------------------------------------------
    def run(self, x, mode: str | Mode = Mode.PLAIN, *, head: bool = True,
            clip: bool = False) -> np.ndarray:
        """Run on one sample (shape ``input_shape``) or a batch (leading batch axis).

        Returns one output for one sample, or an array of outputs for a batch: the
        model's output, its output head (:attr:`head`: a final softmax or sigmoid, a
        classifier's labels) computed here, exactly, from what the mode returned;
        ``head=False`` returns what the mode computed (the logits). A text
        model (one with a ``veil_text`` tokenizer, :mod:`veil.text`) also takes a text
        or a list of texts, tokenized here before any mode sees them.

        Inputs outside the calibrated range (:attr:`input_range`, per feature) are
        refused by ``simulate`` and ``he`` alike (HE's polynomials are only accurate on
        it); ``plain``, ``tee`` and ``mpc`` compute them exactly. ``clip=True`` clamps
        every input into the range before any mode sees it (so all modes compute on the
        same inputs) and warns (:class:`~veil.errors.InputClippedWarning`) with how
        many values and rows changed.

        Modes (:class:`Mode`): ``plain`` and ``simulate`` compute here; ``he`` runs the
        CKKS client here and its server in a local process (started on first use, with
        veil's OpenMP setting whatever this process imported first); ``tee`` and ``mpc``
        start their servers (an enclave; the dealer and two parties) as local processes
        on loopback on first use; all reuse them after, and stop them on :meth:`close`
        (or when this
        object is collected, or the interpreter exits). They are for development: the
        enclave is vouched for by an INSECURE software attester, and the MPC roles all
        run on this machine.

        Raises:
            InputError: the input contract of every mode (:mod:`veil.backends.inputs`):
                a wrong shape, an empty batch, non-numeric or non-finite values
                (before anything starts).
            InputRangeError: ``simulate`` or ``he`` without ``clip``, and a value outside
                the calibrated range (names its row and feature; before anything starts).
            ModeError: an unknown mode.
            UnsupportedOperation: the model has an op ``mode`` cannot run.
            ProcessError: a mode's process did not start (names it; its stderr tail).
        """
        mode = as_mode(mode)
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x
                                  and all(isinstance(t, str) for t in x)):
            if self.text is None:
                raise InputError("this model takes arrays, not texts")
            from .text.tokenize import tokenizer_for

            tokens = tokenizer_for(self.text).encode([x] if isinstance(x, str) else list(x))
            out = self.run(tokens, mode, head=head, clip=clip)
            return out[0] if isinstance(x, str) else out
        batch, single = as_inputs(x, self.input_shape)   # the contract of every mode
        if mode is Mode.PLAIN:
            out = interpret(self.result.source, self._admit(batch, mode, clip))
        elif mode is Mode.SIMULATE:
            check_ops(self.result.lowered, "simulate")    # e.g. a transformer's softmax
            out = interpret(self.result.lowered, self._admit(batch, mode, clip))
        else:
            if mode is Mode.HE:
                self.result.he_plan()         # a model HE cannot run: that error first
            batch = self._admit(batch, mode, clip)
            out = self._local(mode.value).infer_batch(batch)
        if head:
            out = self.head.finish(out)
        return out[0] if single else out

    def _admit(self, batch: np.ndarray, mode: Mode, clip: bool) -> np.ndarray:
        """The inputs ``mode`` computes on: clamped into the calibrated range with
        ``clip`` (every mode, so all compute on the same inputs); otherwise ``simulate``
        and ``he`` refuse values outside it with the HE client's own check."""
        if clip:
            if self.text is not None:
                raise InputError("clip clamps numeric features; this model takes token "
                                 "ids, which clamping would turn into other tokens")
            return self.input_range.clip(batch)
        if mode in (Mode.SIMULATE, Mode.HE):
            self.input_range.check(batch)
        return batch

    def predict(self, x, mode: str | Mode = Mode.PLAIN, *, clip: bool = False
                ) -> np.ndarray:
        """The class of each input (its label when the classifier has labels): the
        largest score, or for one output column ``score > threshold`` (0 for a logit,
        1/2 for a probability). Takes what :meth:`run` takes."""
        out = self.run(x, mode, head=False, clip=clip)
        single = np.ndim(out) == len(self.output_shape)
        classes = self.head.classify(out[None] if single else out)
        return classes[0] if single else classes

    def _local(self, mode: str):
        """``mode``'s local processes, started on first use (again if one died)."""
        with self._lock:
            server = self._servers.get(mode)
            if server is not None and not server.alive():
                del self._servers[mode]
                server.close()
                server = None
            if server is None:
                from .deploy.local import LocalHE, start

                server = self._servers[mode] = (
                    LocalHE(self.client_bundle(), self.server_bundle()) if mode == "he"
                    else start(mode, self.result.source))
            return server

    def close(self) -> None:
        """Release the HE keys and stop the HE server, the TEE and the MPC processes, if
        ``run`` made them. The model can still be run after (it starts them again)."""
        with self._lock:
            _stop_servers(self._servers)

    def __enter__(self) -> "CompiledModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- roles -------------------------------------------------------------------------
    def client_bundle(self):
        from .deploy.bundle import ClientBundle

        return ClientBundle(self.result.he_plan().params, self.manifest())

    def server_bundle(self):
        from .deploy.bundle import ServerBundle

        return ServerBundle(self.result.lowered, self.result.he_plan().params,
                            self.manifest())

    def export(self, directory: str | os.PathLike, *, encrypted_weights: bool = False
               ) -> tuple[Path, Path]:
        """Write ``server/`` (graph, weights, manifest) and ``client/`` bundles.

        With ``encrypted_weights=True`` the server bundle holds zeros instead of weights;
        the model owner then sends ``encrypt_weights(client_public_key)`` to the host.
        """
        if encrypted_weights and self.result.he_plan().parts:   # values cut into parts
            raise CompileError("encrypted weights need every value within one ciphertext; "
                               "this model's span several (raise max_slots, or export "
                               "plaintext weights)")
        d = Path(directory)
        server = self.server_bundle()
        (server.without_weights() if encrypted_weights else server).save(d / "server")
        self.client_bundle().save(d / "client")
        return d / "server", d / "client"

    def encrypt_weights(self, public_key) -> bytes:
        """Model owner: encrypt this model's weights under a client's public key."""
        from .deploy.owner import encrypt_weights

        return encrypt_weights(self.server_bundle(), public_key)

    # -- report ------------------------------------------------------------------------
    def _in_range_rows(self, data, notes: list[str]) -> np.ndarray:
        """Which rows of ``data`` simulate (like HE) accepts; a note says how many it
        refuses, so the predicted accuracy says which inputs it is over."""
        batch = np.asarray(data, dtype=np.float64).reshape((-1, *self.input_shape))
        rows = ~self.input_range.outside(batch).reshape(len(batch), -1).any(axis=1)
        if not rows.all():
            notes.append(f"simulate's predicted accuracy is over the {int(rows.sum())} of "
                         f"{len(rows)} inputs inside the calibrated input range: HE "
                         "refuses the others (run(..., clip=True) clamps them)")
        return rows

    def report(self, data=None, labels=None, *, advice: bool = True) -> Report:
        """Per-layer ranges and fits, depth, parameters; accuracy if labels are given;
        with ``advice`` (the default), which modes suit the model and each one's seconds
        per input on this machine (:mod:`veil.advice`: it runs one input in plain and,
        for a model up to ~512 MiB a party, in MPC within this process)."""
        from .advice import advise

        fits = {a.node: a for a in self.result.activations}
        layers = []
        for node in self.result.polynomial.nodes[1:]:
            lo, hi = self._ranges.get(node.name, (0.0, 0.0))
            row = {"name": node.name, "op": node.attrs.get("source", node.op.value),
                   "input_lo": lo, "input_hi": hi}
            if node.name in fits:
                a = fits[node.name]
                row.update(degree=a.degree, fit_lo=a.lo, fit_hi=a.hi,
                           max_abs_error=a.max_abs_error,
                           max_abs_error_range=a.max_abs_error_range)
            layers.append(row)
        notes = [m for n in self.result.notes for m in n.messages] + self._head_notes()
        accuracy = {}
        if data is not None and labels is not None:
            labels = np.asarray(labels)
            simulates = all(n.op in ops_for("simulate") for n in self.result.lowered.nodes)
            for mode in (Mode.PLAIN, Mode.SIMULATE) if simulates else (Mode.PLAIN,):
                rows = (self._in_range_rows(data, notes) if mode is Mode.SIMULATE
                        else np.ones(len(labels), dtype=bool))
                if not rows.any():
                    continue
                xs = (np.asarray(data, dtype=np.float64).reshape(
                    (-1, *self.input_shape))[rows] if mode is Mode.SIMULATE else data)
                accuracy[mode.value] = float(np.mean(self.predict(xs, mode) == labels[rows]))
        est = self.result.estimate
        estimate = est.to_dict() if est is not None else {}
        plan = self.result.plan
        if plan is None:
            refusal = self.result.he_refusal
            params = {"ring_dim": est.ring_dim, "scaling_bits": est.scaling_bits,
                      "num_large_digits": est.num_large_digits,
                      "security": "HEStd_128_classic", "insecure_test_params": False} \
                if est is not None else {}    # None: HE cannot price it (tree ensembles)
            return Report(layers, est.depth if est is not None else 0, params,
                          "estimated (no slot plan)", [], notes,
                          accuracy=accuracy, estimate=estimate,
                          he_error=refusal[1] if refusal else "no HE plan",
                          advice=advise(self) if advice else [])
        return Report(layers, plan.depth, plan.params.to_dict(), plan.param_reason,
                      list(plan.rotations), notes, plan.lanes, dict(plan.costs), accuracy,
                      estimate, advice=advise(self) if advice else [])


    def _head_notes(self) -> list[str]:
        head = self.head
        notes = []
        if head.graph is not None:
            notes.append(f"output head on the client: {', '.join(head.ops())} (exact, after "
                         "decryption or reconstruction); the server computes up to "
                         f"{self.result.source.output} {self.output_shape}")
        last = self.result.source.node(self.result.source.output)
        if head.graph is None and last.op in START_OPS:
            notes.append(f"the output activation {last.op.value} runs on the server "
                         "(client_head=False): under HE a fitted polynomial, under MPC a "
                         "protocol; on the client it would be exact and free")
        if head.labels is not None or head.returns == "labels":
            notes.append(f"the client maps scores to {len(head.labels or ())} class labels"
                         if head.labels else "the client computes the class index")
        return notes


def _warn_server_head(graph) -> None:
    last = graph.node(graph.output)
    if last.op in START_OPS:
        warnings.warn(f"the output activation {last.op.value} ({last.name!r}) stays on the "
                      "server (client_head=False): under HE a fitted polynomial, under MPC "
                      "a protocol; computed by the client after decryption it is exact and "
                      "free", VeilWarning, stacklevel=3)


def compile(model, calibration, *, input_shape: tuple[int, ...] | None = None,
            degree: int | dict[str, int] | None = None,
            activation_bits: int | None = DEFAULT_ACTIVATION_BITS,
            margin: float = DEFAULT_MARGIN,
            layout: str = "latency", precision_bits: int | None = None,
            insecure_test_params: bool = False, relu_bits: int | None = None,
            max_slots: int | None = None, output: str | None = None,
            client_head: bool = True) -> CompiledModel:
    """Compile a torch ``nn.Module`` or ONNX model (file or ModelProto) for private inference.

    Args:
        model: the trained model; it is not modified.
        calibration: representative inputs, shape (B, *input_shape).
        input_shape: per-sample input shape; defaults to ``calibration.shape[1:]``.
        degree: Chebyshev degree for every activation, or a dict node name -> degree
            for some; the others get the degree ``activation_bits`` asks for.
        activation_bits: each activation without a ``degree`` gets the smallest
            degree (1, 2, 5, 13 or 27: the largest each HE depth evaluates) whose max
            error on its calibrated range is within 2^-activation_bits of its output
            span there (default 8), or 27 when none is; None: 27 for all. Not the
            CKKS output precision (``precision_bits``).
        margin: fraction by which measured activation ranges, and each input feature's
            calibrated range (:mod:`veil.compiler.ranges`), are widened on each side.
        layout: ``"latency"`` (fewest rotations for one input) or ``"throughput"`` (most
            inputs per ciphertext for ``encrypt_batch``).
        precision_bits: minimum output precision; a larger scale (and maybe ring) is
            chosen when the smallest secure parameters would give less (default: the
            fastest secure parameters, which keep at least ~15 bits).
        insecure_test_params: allow small, insecure CKKS parameters (recorded everywhere).
        relu_bits: approximate every ReLU to this many bits of its calibrated bound
            (4-14) by a composite minimax sign and one product (Lee et al. 2021; see
            :mod:`veil.compiler.composite`): accurate for a model trained with ReLU,
            at 12-20 levels per ReLU, so a deep model bootstraps after most of them.
            Default: one Chebyshev fit (or a model fine-tuned for low degree,
            :mod:`veil.finetune`).
        max_slots: the most slots (a power of two) one HE ciphertext holds; a wider
            value is cut into several ciphertexts (:mod:`veil.compiler.tiles`).
            Default: 2^15 (the bootstrapping ring's slots; for a model that does not
            bootstrap, wider rings cost more than the parts they save).
        output: which output of an ONNX graph with several (a scikit-learn classifier's
            ``label`` or ``probabilities``); default: its scores. A label output is
            computed by the client from the scores.
        client_head: compute the model's output head (a final softmax / sigmoid /
            log-softmax and what follows it) on the client, exactly (default); False
            keeps a final activation on the server (fitted by a polynomial under HE).

    Returns:
        A :class:`CompiledModel`.

    Raises:
        UnsupportedOperation: the model uses an operation veil cannot compile.
        CompileError: the calibration data or options are unusable.

    Warns:
        ApproximationWarning, TrainingModeWarning, DepthWarning
        (:class:`veil.errors.VeilWarning`): an activation fitted poorly, a torch model
        in training mode, a depth that forces a larger ring; also in the report's notes.
    """
    calibration = np.asarray(calibration, dtype=np.float64)
    shape = tuple(input_shape) if input_shape is not None else calibration.shape[1:]
    # to_graph warns itself about a torch model in training mode
    graph = to_graph(model, shape, output=output, client_head=client_head)
    _warn_server_head(graph)
    result = compile_graph(graph, calibration, degree=degree,
                           activation_bits=activation_bits, margin=margin,
                           insecure_test_params=insecure_test_params, layout=layout,
                           precision_bits=precision_bits, relu_bits=relu_bits,
                           max_slots=max_slots)
    for w in result.warnings:
        warn(w)
    found = model_warnings(model)           # what to_graph warned about, for the report
    if found:
        result.notes.insert(0, PassNote("frontend", [str(w) for w in found]))
        result.warnings[:0] = found
    # Each layer's input range on the calibration batch, from the approximation pass's
    # forward run (no second pass over the data).
    ranges = {n.name: result.extents[n.inputs[0]] for n in result.polynomial.nodes[1:]}
    # the bounds protect what HE fits over a range; a model with nothing fitted (affine
    # layers only) computes any input exactly
    fitted = any(n.op in (Op.POLY, Op.BOOTSTRAP) for n in result.lowered.nodes)
    return CompiledModel(result, InputRange.calibrate(calibration, margin, fitted), ranges,
                         text=getattr(model, "veil_text", None))


def export_model(model, calibration, directory: str | os.PathLike, *, name: str | None = None,
                 modes=SERVED, input_shape: tuple[int, ...] | None = None,
                 encrypted_weights: bool = False, tee_keys: str | os.PathLike | None = None,
                 compiled: CompiledModel | None = None, **compile_options):
    """Compile ``model`` (torch module, ONNX file or ModelProto) and write its export
    folder for ``veil serve`` (layout: :mod:`veil.deploy.export`).

    Args:
        calibration: representative inputs (B, *input_shape); HE fits its polynomials
            on them.
        name: the model's name in the service (default: the folder's name).
        modes: some of ``he``, ``tee``, ``mpc`` (:data:`veil.modes.SERVED`).
        encrypted_weights: HE server bundle without weights (the model owner sends
            encrypted weights per client).
        tee_keys: encrypt the enclave bundle; its model key is written here (0600).
        compiled: an already compiled model (:func:`compile`) to reuse for HE.
        compile_options: passed to :func:`compile`.

    Returns:
        The folder's :class:`veil.deploy.export.ExportInfo`.
    """
    from .deploy.export import check_modes, check_name, write_export

    modes = check_modes(modes)                 # both before the (long) compile
    name = check_name(name or Path(directory).name)
    calibration = np.asarray(calibration, dtype=np.float64)
    shape = tuple(input_shape) if input_shape is not None else calibration.shape[1:]
    graph = to_graph(model, shape, output=compile_options.get("output"),
                     client_head=compile_options.get("client_head", True))
    he = None
    if "he" in modes:
        compiled = compiled or compile(model, calibration, input_shape=shape,
                                       **compile_options)
        he = (compiled.server_bundle(), compiled.client_bundle())
    return write_export(directory, graph, name=name, modes=modes, he=he,
                        encrypted_weights=encrypted_weights, tee_keys=tee_keys,
                        text=getattr(model, "veil_text", None))
