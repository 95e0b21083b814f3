"""Log a comparison to a local MLflow file store (``veil compare --mlflow DIR``).

One parent run per comparison (its configuration as parameters, the report and the
plots as artifacts) and one nested run per workload and mode (``workload``, ``mode`` and
the compile settings (:func:`compile_params`: ring, depth, degrees) as parameters, the
measured numbers as metrics), so MLflow's run comparison lines the
modes up. mlflow is optional and imported only here: ``require`` says how to install it.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import VeilError

EXPERIMENT = "veil-compare"
METRICS = ("accuracy", "agreement", "max_abs_error", "latency_p50_s", "latency_p95_s",
           "throughput_per_s", "bytes_up", "bytes_down", "client_round_trips",
           "server_rounds", "client_compute_p50_s", "setup_s", "setup_bytes",
           "cosine_min", "cosine_mean")            # the last two: embedding workloads


class MLflowMissing(VeilError):
    """``--mlflow`` was given but mlflow is not installed."""


def require() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise MLflowMissing("--mlflow needs MLflow, which is optional: pip install "
                            "mlflow-skinny (or mlflow), or leave out --mlflow") from None


def _uri(directory: str | Path) -> str:
    """The file store's URI. MLflow 3 keeps its file store in maintenance mode and
    refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set: the issue asks for a plain
    local folder (no database server or SQLAlchemy), so opt in, unless the user chose."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d.as_uri()


def log_run(result: dict, directory: str | Path) -> str:
    """Log parameters and metrics; returns the parent run's id."""
    import mlflow

    mlflow.set_tracking_uri(_uri(directory))
    mlflow.set_experiment(EXPERIMENT)
    cfg = result["config"]
    with mlflow.start_run(run_name=f"veil compare {result['time']}") as parent:
        mlflow.log_params({"modes": ",".join(cfg["modes"]), "n": cfg["n"],
                           "n_he": cfg["n_he"], "batch": cfg["batch"],
                           "insecure_test_params": cfg["insecure_test_params"],
                           "workloads": ",".join(w["name"] for w in result["workloads"]),
                           "cpus": result["machine"]["cpus"]})
        mlflow.log_metric("wall_s", result["wall_s"])
        for w in result["workloads"]:
            for mode, r in w["modes"].items():
                with mlflow.start_run(run_name=f"{w['name']} {mode}", nested=True):
                    mlflow.log_params({"workload": w["name"], "mode": mode,
                                       "batch": r["batch"], "n": r["n"],
                                       **compile_params(w)})
                    mlflow.log_metrics({k: float(r[k]) for k in METRICS
                                        if r.get(k) is not None})
                    mlflow.log_metrics({f"peak_rss_{k}": float(v)
                                        for k, v in r["peak_rss"].items()})
        return parent.info.run_id


def compile_params(workload: dict) -> dict:
    """What the compiler chose for one workload, as MLflow parameters: the CKKS ring,
    scale and security, the multiplicative depth, rotation keys, lanes and each fitted
    activation's degree (in graph order), so runs of differently compiled models can be
    told apart; {} values are left out (a model HE cannot run has no plan)."""
    plan = workload.get("he_plan") or {}
    params = plan.get("params") or {}
    out = {"ring_dim": params.get("ring_dim"), "scaling_bits": params.get("scaling_bits"),
           "security": params.get("security"), "depth": plan.get("depth"),
           "rotation_keys": plan.get("rotation_keys"), "lanes": plan.get("lanes"),
           "degrees": ",".join(str(d) for d in plan.get("degrees", ())) or None,
           "insecure_test_params": params.get("insecure_test_params")}
    return {k: v for k, v in out.items() if v is not None}


def log_artifacts(run_id: str, directory: str | Path, out: Path) -> None:
    """Attach ``report.md``, ``report.json`` and ``plots/`` to the parent run."""
    import mlflow

    mlflow.set_tracking_uri(_uri(directory))
    with mlflow.start_run(run_id=run_id):
        for name in ("report.md", "report.json"):
            mlflow.log_artifact(str(out / name))
        if (out / "plots").is_dir():
            mlflow.log_artifacts(str(out / "plots"), artifact_path="plots")
