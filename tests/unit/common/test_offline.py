"""Nothing phones home: the switches of ``common/offline.py`` are real ones, every
fedlora process has them off before Flower or onnxruntime could read them, every
Flower process fedlora starts carries them, and onnxruntime run through fedlora leaves
no telemetry store behind.

The process-level checks run in fresh interpreters with a temporary HOME and the
switches removed from their environment: in this pytest process they are long set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from common.offline import OFFLINE_ENVIRONMENT, force_offline_environment
from common.processes import flower_environment

ROOT = Path(__file__).resolve().parents[3]
ORT_STORE = Path(".cache") / "Microsoft"
# onnxruntime suppresses its telemetry on its own in CI and in its own test harness
# (core/platform/telemetry_environment.h); the control run must not inherit those.
ORT_QUIET_ANYWAY = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
    "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
    "ORT_RUNNING_UNIT_TESTS",
)
# Where an upload of the control run would go: nowhere (onnxruntime's 1DS client is
# libcurl, which honours these; port 9 on loopback refuses the connection).
DEAD_PROXY = {
    name: "http://127.0.0.1:9" for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
}
ENABLING = {
    "FLWR_TELEMETRY_ENABLED": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "0",
    "ORT_DISABLE_TELEMETRY": "0",
    "RAY_USAGE_STATS_ENABLED": "1",
    "HF_HUB_OFFLINE": "0",
    "HF_HUB_DISABLE_TELEMETRY": "0",
    "DO_NOT_TRACK": "0",
    "FLWR_SUPERGRID_API_URL": "https://api.flower.ai/v1",
}


def _bare_environment(home: Path) -> dict[str, str]:
    """This environment without the switches (nor anything else that quiets
    onnxruntime), HOME pointing at ``home``: a process that sets nothing itself."""
    dropped = {*OFFLINE_ENVIRONMENT, *ORT_QUIET_ANYWAY, "XDG_CACHE_HOME", "no_proxy", "NO_PROXY"}
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**environment, **DEAD_PROXY, "HOME": str(home)}


def _python(source: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=ROOT,
        env=_bare_environment(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed


@pytest.fixture
def matmul_model(tmp_path: Path) -> Path:
    """The smallest useful model: logits = features @ W (2 classes)."""
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 2.0])
    node = helper.make_node("MatMul", ["features", "weight"], ["logits"], name="/head/MatMul")
    graph = helper.make_graph([node], "matmul", [features], [logits], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------- the switches ---

# Where each library reads its switch, in the installed packages (a library that
# renames one on an upgrade turns this red instead of silently switching back on).
READ_BY = {
    "FLWR_TELEMETRY_ENABLED": ("flwr", "supercore/telemetry.py"),
    "FLWR_DISABLE_UPDATE_CHECK": ("flwr", "supercore/constant.py"),
    "ORT_DISABLE_TELEMETRY": ("onnxruntime", "capi/libonnxruntime.so*"),
    "RAY_USAGE_STATS_ENABLED": ("ray", "_common/usage/usage_constants.py"),
    "HF_HUB_OFFLINE": ("huggingface_hub", "constants.py"),
    "HF_HUB_DISABLE_TELEMETRY": ("huggingface_hub", "constants.py"),
    "DO_NOT_TRACK": ("huggingface_hub", "constants.py"),
    "FLWR_SUPERGRID_API_URL": ("flwr", "supercore/constant.py"),
}


def test_every_switch_is_one_an_installed_library_reads() -> None:
    assert set(READ_BY) == set(OFFLINE_ENVIRONMENT)
    for name, (package, pattern) in READ_BY.items():
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None, package
        files = sorted(Path(spec.origin).parent.glob(pattern))
        assert files, f"{package}/{pattern} is not installed"
        assert any(name.encode() in path.read_bytes() for path in files), (name, files)


def test_force_offline_environment_overwrites_values_that_enable_reporting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENABLING.items():
        monkeypatch.setenv(name, value)
    force_offline_environment()
    assert {name: os.environ[name] for name in OFFLINE_ENVIRONMENT} == dict(OFFLINE_ENVIRONMENT)


def test_flower_processes_get_the_switches_even_if_os_environ_turned_them_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENABLING.items():
        monkeypatch.setenv(name, value)
    environment = flower_environment({"FLWR_HOME": "/srv/flwr", "FLWR_TELEMETRY_ENABLED": "1"})
    assert {name: environment[name] for name in OFFLINE_ENVIRONMENT} == dict(OFFLINE_ENVIRONMENT)
    assert environment["FLWR_HOME"] == "/srv/flwr"  # what the caller adds is kept
    assert environment["PATH"].startswith(str(Path(sys.executable).parent))


@pytest.mark.parametrize("unit", sorted((ROOT / "sites" / "systemd").glob("*.service")))
def test_the_systemd_units_set_the_same_switches(unit: Path) -> None:
    pairs = re.findall(r"^Environment=(\w+)=(\S+)$", unit.read_text(), re.MULTILINE)
    assert dict(OFFLINE_ENVIRONMENT).items() <= dict(pairs).items()


# ---------------------------------------------------- fresh fedlora processes ---


@pytest.mark.slow  # a fresh interpreter importing both Flower apps (6 s)
def test_importing_the_flower_apps_switches_everything_off(tmp_path: Path) -> None:
    """Flower loads ``client.app:app`` / ``server.app:app`` by name; in a process with
    nothing set, importing them is enough for flwr (which reads its switch at import),
    the hub and onnxruntime (loaded by the ClientApp's artifact checks) to be off."""
    source = """if True:
        import json, os, sys
        import client.app, server.app
        import flwr.supercore.telemetry, huggingface_hub.constants as hub
        print(json.dumps({
            "environ": {name: os.environ.get(name) for name in sys.argv[1:]},
            "flwr": flwr.supercore.telemetry.FLWR_TELEMETRY_ENABLED,
            "hub": [hub.HF_HUB_OFFLINE, hub.HF_HUB_DISABLE_TELEMETRY],
            "onnxruntime loaded": "onnxruntime" in sys.modules,
        }))
    """
    report = json.loads(_python(source, tmp_path, *OFFLINE_ENVIRONMENT).stdout)
    assert report["environ"] == dict(OFFLINE_ENVIRONMENT)
    assert report["flwr"] == "0"
    assert report["hub"] == [True, True]
    assert report["onnxruntime loaded"] is True  # so the store check below means something
    assert not (tmp_path / ORT_STORE).exists()


def test_onnxruntime_through_fedlora_leaves_no_telemetry_store(
    tmp_path: Path, matmul_model: Path
) -> None:
    """The control first: plain onnxruntime in the same bare environment does write
    its device id and event queue under HOME, so the check can fail."""
    plain = tmp_path / "plain-home"
    plain.mkdir()
    _python(
        "import sys, onnxruntime; onnxruntime.InferenceSession(sys.argv[1])",
        plain,
        str(matmul_model),
    )
    assert (plain / ORT_STORE / "DeveloperTools" / ".onnxruntime").is_dir()

    home = tmp_path / "fedlora-home"
    home.mkdir()
    source = """if True:
        import sys
        from pathlib import Path
        import numpy as np
        from common.inference import OnnxClassifier
        logits = OnnxClassifier(Path(sys.argv[1])).logits({"features": np.eye(2, dtype=np.float32)})
        print(logits.tolist())
    """
    assert json.loads(_python(source, home, str(matmul_model)).stdout) == [[1.0, 0.0], [0.0, 2.0]]
    assert not (home / ORT_STORE).exists()


@pytest.mark.slow  # a fresh interpreter running onnxruntime's quantizer (5 s)
def test_quantizing_through_fedlora_leaves_no_telemetry_store(
    tmp_path: Path, matmul_model: Path
) -> None:
    """The coordinator's int8 step, in a process whose first fedlora import is the
    exporter (onnxruntime's quantizer is loaded only once the switches are set)."""
    source = """if True:
        import sys
        from pathlib import Path
        from server.export import quantize_int8
        print(quantize_int8(Path(sys.argv[1]), Path(sys.argv[2]), []))
    """
    home = tmp_path / "home"
    home.mkdir()
    int8 = tmp_path / "model.int8.onnx"
    _python(source, home, str(matmul_model), str(int8))
    assert int8.is_file()
    assert not (home / ORT_STORE).exists()


def test_flower_processes_never_open_the_legacy_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLWR_INTERNAL_GRPC_*=1 would make the SuperLink serve its Control and Fleet APIs
    on 0.0.0.0 as well, past the perimeter: forced off for every Flower process."""
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    environment = flower_environment()
    assert environment["FLWR_INTERNAL_GRPC_CONTROL_API"] == "0"
    assert environment["FLWR_INTERNAL_GRPC_FLEET_API"] == "0"
    spec = importlib.util.find_spec("flwr.superlink.cli.flower_superlink")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    assert 'os.getenv(FLWR_INTERNAL_GRPC_CONTROL_API) == "1"' in source
