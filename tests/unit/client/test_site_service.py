"""One site object per process: data and base model read once, again only when their
files change; a reused model starts every message as a fresh one would; one pre-flight
for rounds, `site check` and `site run`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from client.app import build_client_app
from client.cli import check_report
from client.daemon import check_ready
from client.models import BaseModelCache
from client.preflight import preflight
from client.service import SiteCache
from client.site import Site
from client.training import DPTrainer
from common.adapters import AdapterLayout, is_lora_a
from common.config import load_site_config
from common.errors import PolicyError
from common.tasks import model_fingerprint
from tests.conftest import write_site_config
from tests.unit.client.rounds import initial_adapter, node_context, round_request, site_message


def _site(scenario, workspace, tmp_path, site_id="bank-a", **privacy) -> Site:
    path = write_site_config(scenario, workspace, site_id, tmp_path, **privacy)
    return Site(load_site_config(path))


def _touch_later(path: Path) -> None:
    """Change a file so that its stamp changes even on a coarse clock."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_data_is_read_once_and_again_after_a_file_changes(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path)
    first = site.load_data()
    assert site.load_data() is first and site.data.loads == 1
    table = next(p for p in site.config.data.path.parent.iterdir() if p.suffix == ".csv")
    assert table == site.config.data.path
    _touch_later(table)
    again = site.load_data()
    assert site.data.loads == 2 and again is not first
    assert again.dataset == first.dataset  # same bytes: the same ledger
    with table.open("a") as handle:
        handle.write(handle.newlines or "\n")
    assert site.load_data().dataset != first.dataset and site.data.loads == 3


def test_a_new_file_in_a_dicom_folder_is_seen(small_scenario, untrained_workspace, tmp_path):
    site = _site(small_scenario, untrained_workspace, tmp_path, site_id="hospital-b")
    site.load_data()
    signature = site.data.signature()
    (site.config.data.path / "late.txt").write_text("not an image")
    try:
        assert site.data.signature() != signature
    finally:
        (site.config.data.path / "late.txt").unlink()
    assert site.data.signature() == signature


def test_the_base_model_is_hashed_and_loaded_once(small_scenario, untrained_workspace, tmp_path):
    site = _site(small_scenario, untrained_workspace, tmp_path)
    request = round_request(site)
    adapter = initial_adapter(site, request)
    expected = model_fingerprint(site.config.site.base_model)
    assert site.models.fingerprint() == expected == site.models.fingerprint()
    site.build_model(request, adapter)
    site.build_model(request, adapter)
    assert site.models.loads == 1


def _logits(site: Site, model: torch.nn.Module) -> np.ndarray:
    holdout = site.load_data().holdout
    return torch.cat(DPTrainer(model, site.task.input_names).logits(holdout)).numpy()


@pytest.mark.slow  # calibrates (PRV) and trains a DP round (3-7 s)
def test_a_reused_model_starts_each_message_like_a_fresh_one(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path, epsilon=50.0)
    request = round_request(site)
    adapter = initial_adapter(site, request)
    fresh = BaseModelCache(site.task, site.config.site.base_model)
    reference = _logits(site, fresh.model(request.lora, request.layout, adapter))
    site.train(request, adapter, run="run-1")  # trains the cached model in place
    reused = site.build_model(request, adapter)
    np.testing.assert_array_equal(_logits(site, reused), reference)
    assert all(p.grad is None for p in reused.parameters())
    assert not hasattr(next(p for p in reused.parameters() if p.requires_grad), "grad_sample")


def test_the_trainable_set_follows_each_requests_layout(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path)
    request = round_request(site)
    whole = initial_adapter(site, request)
    ffa = AdapterLayout(freeze_lora_a=True, seed=request.seed)
    model = site.models.model(request.lora, ffa, ffa.trained(whole))
    assert not any(p.requires_grad for n, p in model.named_parameters() if is_lora_a(n))
    model = site.models.model(request.lora, request.layout, whole)
    assert all(p.requires_grad for n, p in model.named_parameters() if is_lora_a(n))


def test_the_app_keeps_one_site_per_process_and_an_introduction_reads_no_data(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path)
    cache = SiteCache()
    site = cache.get(path)
    assert cache.get(path) is site and cache.builds == 1
    site.joined("run-1")
    assert site.data.loads == 0 and site.models.loads == 0
    _touch_later(path)
    assert cache.get(path) is not site and cache.builds == 2


def test_messages_to_one_app_reuse_the_sites_data(
    small_scenario, untrained_workspace, tmp_path, flower_task_identity
) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path)
    site = Site(load_site_config(path))
    request = round_request(site)
    app = build_client_app()
    context = node_context(path)
    started = time.perf_counter()
    introduction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    assert not app(introduction, context).has_error()
    for _ in range(2):
        reply = app(site_message(site, request, MessageType.EVALUATE), context)
        assert not reply.has_error()
    assert time.perf_counter() - started < 60


def test_site_check_says_not_ready_when_delta_is_not_below_one_over_the_people(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path, delta=0.009)
    report = check_report(path)
    assert report["ok"] is False
    assert any("is not below 1/" in problem for problem in report["problems"])
    site = Site(load_site_config(path))
    with pytest.raises(PolicyError, match="is not below 1/"):
        preflight(site, "train", round_request(site)).raise_first()
    assert any("is not below 1/" in problem for problem in check_ready(site.config))


def test_serving_also_needs_pinned_code_and_the_coordinators_key(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path)
    assert preflight(site, "check").ok
    problems = [str(problem) for problem in preflight(site, "serve").problems]
    assert any(p.startswith("policy.client_releases") for p in problems)
    assert any(p.startswith("site.coordinator_key") for p in problems)


def test_a_pickled_app_keeps_using_the_processes_sites() -> None:
    """Flower's simulation engine pickles the ClientApp with every message (Ray's
    cloudpickle): the cache must stay the receiving process's, not a fresh copy."""
    import pickle

    from ray import cloudpickle

    from client.service import process_site_cache

    cache = process_site_cache()
    assert pickle.loads(cloudpickle.dumps(cache)) is cache
    build_client_app()  # the app holds the process's cache, so it pickles too
    assert pickle.loads(cloudpickle.dumps(build_client_app())) is not None
