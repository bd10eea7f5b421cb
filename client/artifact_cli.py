"""``fedlora artifact``: verify, inspect and run the distributed model (model consumers,
site operators, auditors)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.predict import (
    Records,
    dicom_records,
    load_preprocessing,
    table_records,
    text_records,
)
from client.predict import predict as run_model
from common.artifact import MANIFEST, MODEL_INT8, Manifest, VerifiedArtifact, verify_artifact
from common.audit.review import COORDINATOR_PUBLIC_KEY
from common.config import load_site_config
from common.errors import ArtifactError, ConfigError
from common.signing import load_public_key

ARTIFACT_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
KEY_HELP = "PEM public key of the coordinator that must have signed the artifact."
SITE_HELP = "A site config (TOML): trust the coordinator key it pins (site.coordinator_key)."
TRUST_RUN_KEY_HELP = (
    f"Verify with the run's own {COORDINATOR_PUBLIC_KEY} two folders up "
    "(RUN_DIR/artifacts/<task>). This proves integrity only, not who signed: whoever "
    "can alter and re-sign the artifact can replace that key too."
)
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
key_option = click.option("--key", type=FILE, help=KEY_HELP)
site_option = click.option("--site", type=FILE, help=SITE_HELP)
trust_run_key_option = click.option("--trust-run-key", is_flag=True, help=TRUST_RUN_KEY_HELP)
RUN_KEY_SOURCE = (
    f"the run's {COORDINATOR_PUBLIC_KEY}, beside the artifact (--trust-run-key): this "
    "proves integrity, not who signed; pin the coordinator's key with --key or --site"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def artifact() -> None:
    """Verify, inspect and run a signed int8 model artifact.

    \b
    An artifact folder holds model.int8.onnx (the merged model, int8), adapter/ (the
    final LoRA adapter alone), manifest.json (provenance, ε per site, sizes, hashes,
    fp32 vs int8 metrics from the sites) and manifest.sig (the coordinator's Ed25519
    signature of the manifest).
    """


def trusted_key(
    directory: Path,
    key: Path | None,
    site: Path | None,
    *,
    trust_run_key: bool = False,
    run_key_offered: bool = True,
) -> tuple[Ed25519PublicKey, str]:
    """The key to verify with, and where it came from: only one the caller named.

    The run's own key lies beside the artifact, so whoever alters and re-signs the
    model can replace it too: it is used only on an explicit ``--trust-run-key``
    (integrity, for reviewing a run), never as a silent fallback. ``run_key_offered``
    is False for commands that never trust it (predict), so the refusal names only
    what they accept."""
    if sum((key is not None, site is not None, trust_run_key)) > 1:
        named = "--key, --site or --trust-run-key" if run_key_offered else "--key or --site"
        raise click.UsageError(f"give one of {named}, not several")
    if key is not None:
        return load_public_key(key), f"--key {key}"
    if site is not None:
        pinned = load_site_config(site).site.coordinator_key
        if pinned is None:
            raise ConfigError(f"{site} sets no site.coordinator_key")
        return load_public_key(pinned), f"pinned by {site}"
    if trust_run_key:
        beside = directory.resolve().parent.parent / COORDINATOR_PUBLIC_KEY
        if not beside.is_file():
            raise ArtifactError(
                "no-trusted-key",
                f"--trust-run-key: no {COORDINATOR_PUBLIC_KEY} two folders up from "
                f"{directory} (expected RUN_DIR/artifacts/<task>)",
            )
        return load_public_key(beside), RUN_KEY_SOURCE
    options = "--key COORDINATOR.pub or --site SITE_CONFIG"
    if run_key_offered:
        options = (
            "--key COORDINATOR.pub, --site SITE_CONFIG, or --trust-run-key (the run's own "
            "key beside the artifact: integrity only, not who signed)"
        )
    raise ArtifactError("no-trusted-key", f"no trusted coordinator key: pass {options}")


def _verified(
    directory: Path,
    key: Path | None,
    site: Path | None,
    *,
    trust_run_key: bool = False,
    run_key_offered: bool = True,
) -> tuple[VerifiedArtifact, str]:
    public_key, source = trusted_key(
        directory, key, site, trust_run_key=trust_run_key, run_key_offered=run_key_offered
    )
    return verify_artifact(directory, public_key), source


@artifact.command()
@click.argument("directory", metavar="DIR", type=ARTIFACT_DIR)
@key_option
@site_option
@trust_run_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify(
    directory: Path, key: Path | None, site: Path | None, trust_run_key: bool, as_json: bool
) -> None:
    """Check the manifest's signature and every file's size and SHA-256.

    The trusted key is the one given: --key, the one a site config pins (--site), or,
    with --trust-run-key, the run's own keys/coordinator.pub (integrity only: it lies
    beside the artifact, so it does not prove who signed). Without any of them nothing
    is trusted and the command exits 2.

    Exits 0 when the artifact is intact and signed by the trusted key, 1 when a check
    fails (the output names which: bad-signature, bad-manifest, missing-file,
    size-mismatch, hash-mismatch), 2 when it cannot be checked at all.
    """
    public_key, source = trusted_key(directory, key, site, trust_run_key=trust_run_key)
    try:
        verified = verify_artifact(directory, public_key)
    except ArtifactError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "check": exc.kind, "reason": str(exc)}))
        else:
            console = Console(stderr=True)
            console.print(f"[red]NOT VERIFIED[/red] ({exc.kind}): {escape(str(exc))}")
        sys.exit(1)
    manifest = verified.manifest
    if as_json:
        document = {
            "ok": True,
            "task": manifest.task,
            "signer": manifest.signer,
            "key_source": source,
            "manifest_sha256": verified.manifest_sha256,
            "checked": manifest.metrics is not None,
            "files": {name: entry.sha256 for name, entry in manifest.files.items()},
        }
        click.echo(json.dumps(document, indent=2))
        return
    console = Console()
    console.print(f"[green]verified[/green]  {escape(str(directory))}  ({manifest.task})")
    console.print(f"  signed by {manifest.signer} ({escape(source)})", highlight=False)
    for name, entry in sorted(manifest.files.items()):
        console.print(
            f"  {name}: {entry.bytes} bytes, sha256 {entry.sha256[:16]}…", highlight=False
        )
    if manifest.metrics is None:
        console.print("  [yellow]not yet checked by the sites: sites will not install it[/yellow]")


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _inspect_tables(manifest: Manifest) -> list[Table]:
    overview = Table(title=f"artifact — {manifest.task}", box=box.SIMPLE_HEAVY, show_header=False)
    overview.add_column(style="bold")
    overview.add_column()
    int8 = manifest.files[MODEL_INT8].bytes
    fp32 = manifest.quantization.fp32_onnx_bytes
    rows = [
        ("run", manifest.run),
        ("created", manifest.created),
        ("code", manifest.code_version),
        ("base model sha256", manifest.base_model_sha256),
        ("signer", manifest.signer),
        ("LoRA", ", ".join(f"{k} {v}" for k, v in manifest.lora.items())),
        ("training", ", ".join(f"{k} {v}" for k, v in manifest.training.items())),
        ("inputs", ", ".join(f"{n} {s.dtype}{s.shape}" for n, s in manifest.inputs.items())),
        (
            "quantization",
            f"{manifest.quantization.method} ({manifest.quantization.weight_type} "
            f"weights on {'/'.join(manifest.quantization.op_types)}; fp32 kept: "
            f"{', '.join(manifest.quantization.kept_fp32) or 'none'})",
        ),
        ("size int8 / fp32", f"{_mb(int8)} / {_mb(fp32)} = {int8 / fp32:.2f}"),
    ]
    if manifest.audit is not None:
        rows.append(
            (
                "audit head",
                f"{manifest.audit.log} entry {manifest.audit.seq} {manifest.audit.hash[:16]}…",
            )
        )
    for label, value in rows:
        overview.add_row(label, escape(str(value)))

    privacy = Table(title="privacy per site", box=box.SIMPLE_HEAVY)
    for column in ("site", "ε", "δ", "rounds", "accountant"):
        privacy.add_column(column, justify="left" if column in ("site", "accountant") else "right")
    for entry in manifest.sites:
        privacy.add_row(
            escape(entry.site),
            f"{entry.epsilon:.2f}",
            f"{entry.delta:g}",
            str(entry.rounds_trained),
            escape(entry.accountant or "?"),
        )

    metrics = Table(title="federated check (held-out data at the sites)", box=box.SIMPLE_HEAVY)
    for column in ("model", "accuracy", "AUC", "loss", "examples"):
        metrics.add_column(column, justify="left" if column == "model" else "right")
    if manifest.metrics is None:
        metrics.add_row("—", "not checked yet", "", "", "")
    else:
        for name, scores in (("fp32", manifest.metrics.fp32), ("int8", manifest.metrics.int8)):
            metrics.add_row(
                name,
                f"{scores.accuracy:.4f}",
                "—" if scores.auc is None else f"{scores.auc:.4f}",
                f"{scores.loss:.4f}",
                str(scores.examples),
            )
        metrics.caption = (
            f"int8 − fp32 accuracy: {-manifest.metrics.accuracy_loss * 100 + 0.0:+.2f} points; "
            f"sites: {escape(', '.join(manifest.metrics.sites))}"
        )
    return [overview, privacy, metrics]


@artifact.command()
@click.argument("directory", metavar="DIR", type=ARTIFACT_DIR)
@key_option
@site_option
@trust_run_key_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest (and verification) as JSON."
)
def inspect(
    directory: Path, key: Path | None, site: Path | None, trust_run_key: bool, as_json: bool
) -> None:
    """Show the manifest: provenance, ε per site, sizes, hashes and fp32/int8 metrics.

    The artifact is verified first, with the key given as for verify (--key, --site, or
    --trust-run-key for integrity only); when that fails, or no key is given, the
    manifest is still shown, marked NOT VERIFIED, and the command exits 1.
    """
    verification: dict[str, Any]
    try:
        verified, source = _verified(directory, key, site, trust_run_key=trust_run_key)
        manifest = verified.manifest
        verification = {"verified": True, "key_source": source}
    except ArtifactError as exc:
        try:
            manifest = Manifest.model_validate_json((directory / MANIFEST).read_bytes())
        except (OSError, ValidationError) as unreadable:
            console = Console(stderr=True)
            console.print(f"[red]NOT VERIFIED[/red] ({exc.kind}): {escape(str(exc))}")
            console.print(f"and {MANIFEST} cannot be shown: {escape(str(unreadable))}")
            sys.exit(1)
        verification = {"verified": False, "check": exc.kind, "reason": str(exc)}
    if as_json:
        click.echo(
            json.dumps({**verification, "manifest": manifest.model_dump(mode="json")}, indent=2)
        )
        sys.exit(0 if verification["verified"] else 1)
    console = Console()
    for table in _inspect_tables(manifest):
        console.print(table)
    if verification["verified"]:
        console.print(f"[green]verified[/green] ({escape(verification['key_source'])})")
    else:
        console.print(
            f"[red]NOT VERIFIED[/red] ({verification['check']}): {escape(verification['reason'])}"
        )
        sys.exit(1)


@artifact.command()
@click.argument("directory", metavar="DIR", type=ARTIFACT_DIR)
@click.option(
    "--dicom",
    type=click.Path(exists=True, path_type=Path),
    help="A DICOM file, or a folder searched for them (unusable files are reported and skipped).",
)
@click.option(
    "--csv",
    "table",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CSV (or .parquet) table with the columns the model was trained on.",
)
@click.option(
    "--text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CSV, Parquet or JSONL file of texts, in a column named as in training "
    "(tokenised with the site's base-model tokenizer; empty texts are skipped).",
)
@click.option(
    "--preprocessing",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The site cleaning to apply (default: DIR/preprocessing.json, written when a site "
    "installs the artifact).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the predictions to this CSV instead of printing them.",
)
@click.option(
    "--key",
    type=FILE,
    help="PEM public key of the coordinator that must have signed the artifact.",
)
@site_option
@click.option(
    "--allow-unchecked",
    is_flag=True,
    help="Run an artifact the sites have not checked yet (no metrics in its manifest).",
)
def predict(
    directory: Path,
    dicom: Path | None,
    table: Path | None,
    text: Path | None,
    preprocessing: Path | None,
    output: Path | None,
    key: Path | None,
    site: Path | None,
    allow_unchecked: bool,
) -> None:
    """Run the int8 model on DICOM images, table rows or texts, cleaned as in training.

    The artifact is verified first with a pinned key (--key, or the one a site config
    pins with --site); one that fails verification, or that the sites have not checked,
    is never run.
    """
    if sum(source is not None for source in (dicom, table, text)) != 1:
        raise click.UsageError("give exactly one of --dicom PATH, --csv PATH or --text PATH")
    verified, _ = _verified(directory, key, site, run_key_offered=False)
    if verified.manifest.metrics is None and not allow_unchecked:
        raise ArtifactError(
            "unchecked",
            "the sites have not checked this artifact (no metrics in its manifest); "
            "pass --allow-unchecked to run it anyway",
        )
    cleaning = load_preprocessing(directory, verified.manifest, preprocessing)
    records: Records
    if dicom is not None:
        records = dicom_records(cleaning, dicom)
    elif text is not None:
        records = text_records(cleaning, text)
    else:
        assert table is not None
        records = table_records(cleaning, table)
    result = run_model(directory, verified.manifest, records, cleaning.get("classes"))
    rows = result.rows()
    err = Console(stderr=True)
    for rejection in result.skipped:
        err.print(
            f"[yellow]skipped[/yellow] {escape(rejection.record)}: {escape(rejection.reason)}"
        )
    if output is not None:
        fields = ["record", "prediction", *(f"p_{c}" for c in result.classes)]
        with output.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        err.print(f"{len(rows)} predictions written to {escape(str(output))}")
        return
    view = Table(box=box.SIMPLE_HEAVY)
    for field in ["record", "prediction", *(f"p_{c}" for c in result.classes)]:
        view.add_column(field, justify="left" if field in ("record", "prediction") else "right")
    for row in rows:
        view.add_row(*(str(value) for value in row.values()))
    Console().print(view)
    err.print(f"{len(rows)} predicted, {len(result.skipped)} skipped")
