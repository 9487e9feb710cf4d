"""Meta-training: config validation, the model directory it writes, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401

from metarec import checkpoint
from metarec.model import PreferenceModel, read_model_json
from metarec.training import DEFAULTS, TrainSettings, run_meta_training

TINY = {"meta_steps": 30, "meta_batch": 8, "inner_steps": 2, "val_every": 10, "checkpoint_every": 10}
# Ten steps with a checkpoint and a validation at step 5: enough to resume from a validated best.
CHECKPOINTED = {**TINY, "meta_steps": 10, "checkpoint_every": 5, "val_every": 5}


@pytest.fixture(scope="module")
def tiny_preprocessed(tmp_path_factory):
    from metarec.preprocessing import run_preprocessing

    directory = tmp_path_factory.mktemp("pre-tiny")
    run_preprocessing("synthetic:tiny", None, None, str(directory))
    return directory


def test_config_defaults_and_unknown_keys():
    assert TrainSettings.from_dict(None).to_dict() == DEFAULTS
    assert TrainSettings.from_dict({"meta_steps": 3}).meta_steps == 3
    with pytest.raises(ValueError, match="train settings: unknown key.*learning_rate"):
        TrainSettings.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="adapt_mode"):
        TrainSettings.from_dict({"adapt_mode": "some"})
    with pytest.raises(ValueError, match="ema"):
        TrainSettings.from_dict({"ema": 1.0})


def test_unknown_method_is_refused(tiny_preprocessed, tmp_path):
    with pytest.raises(ValueError, match="method"):
        run_meta_training(str(tiny_preprocessed), "protonet", TINY, str(tmp_path))


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_training_writes_a_loadable_model_directory(tiny_preprocessed, tmp_path, method):
    out = tmp_path / "model"
    threads = torch.get_num_threads()
    result = run_meta_training(str(tiny_preprocessed), method, {**TINY, "adapt_mode": "head"}, str(out))
    assert torch.get_num_threads() == threads  # cpu_threads applies to the run only
    assert {"model.pt", "model.json", "schema.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    document = read_model_json(out)
    assert document["method"] == method
    assert document["adapt"] == {"mode": "head", "inner_steps": 2, "inner_lr": DEFAULTS["inner_lr"]}
    assert json.loads((out / "schema.json").read_text()) == json.loads(
        (tiny_preprocessed / "schema.json").read_text()
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["curve"]) == 30 and [v["step"] for v in metrics["val_history"]] == [0, 10, 20, 30]
    best = min(metrics["val_history"], key=lambda v: v["mae"])
    assert result["best_step"] == best["step"] and result["val_mae"] == pytest.approx(best["mae"])
    assert 0 < result["val_mae"] < 2
    model = PreferenceModel.from_dir(out)
    assert model.n_items == json.loads((out / "schema.json").read_text())["n_items"]
    assert [step for step, _ in checkpoint.list_checkpoints(str(out / "checkpoints"))] == [20, 30]


def test_the_start_ships_when_meta_training_never_beats_it_on_validation(tiny_preprocessed, tmp_path):
    # An outer rate this large wrecks the model from the first step, so every validated checkpoint is
    # worse than the start: the start (step 0) is what must ship, exactly as 0 meta-steps leave it.
    config = {**TINY, "outer_lr": 5.0, "checkpoint_every": 0}
    result = run_meta_training(str(tiny_preprocessed), "fomaml", config, str(tmp_path / "wrecked"))
    history = json.loads((tmp_path / "wrecked" / "metrics.json").read_text())["val_history"]
    assert [v["step"] for v in history] == [0, 10, 20, 30]
    assert min(v["mae"] for v in history[1:]) > history[0]["mae"]  # the premise: training only hurt
    assert result["best_step"] == 0 and result["val_mae"] == pytest.approx(history[0]["mae"])
    run_meta_training(str(tiny_preprocessed), "fomaml", {**config, "meta_steps": 0}, str(tmp_path / "start"))
    shipped = PreferenceModel.from_dir(tmp_path / "wrecked").state_dict()
    start = PreferenceModel.from_dir(tmp_path / "start").state_dict()
    assert shipped.keys() == start.keys()
    assert all(torch.equal(shipped[name], start[name]) for name in start)


def test_meta_training_lowers_the_training_loss(tiny_preprocessed, tmp_path):
    config = {**TINY, "meta_steps": 60, "outer_lr": 0.01, "val_every": 0, "checkpoint_every": 0}
    run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    losses = [loss for _, loss in metrics["curve"]]
    assert sum(losses[-15:]) / 15 < sum(losses[:15]) / 15
    # val_every 0: the final weights ship, validated once; the start is no candidate (docs/pipeline.md).
    assert [v["step"] for v in metrics["val_history"]] == [60] and metrics["best_step"] == 60


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_frozen_groups_keep_their_starting_weights_and_the_rest_trains(tiny_preprocessed, tmp_path, method):
    from metarec.model import parameter_group
    from metarec.model_init import build_model
    from metarec.tasks import Preprocessed

    config = {**TINY, "adapt_mode": "head", "freeze": ["encoder", "hidden"], "val_every": 0}
    run_meta_training(str(tiny_preprocessed), method, config, str(tmp_path))
    trained = PreferenceModel.from_dir(tmp_path)
    torch.manual_seed(TrainSettings.from_dict(config).seed)  # as the trainer does before it builds
    start = build_model(Preprocessed.load(str(tiny_preprocessed)), TrainSettings.from_dict(config))
    moved = {}
    for (name, before), after in zip(start.named_parameters(), trained.parameters(), strict=True):
        group = parameter_group(trained, name)
        moved[group] = moved.get(group, False) or not torch.equal(before.detach(), after.detach())
    assert moved["encoder"] is False and moved["hidden"] is False
    assert moved["items"] and moved["head"] and moved["user"]


def test_freeze_refuses_an_unknown_group():
    with pytest.raises(ValueError, match="freeze: unknown parameter groups.*decoder"):
        TrainSettings.from_dict({"freeze": ["decoder"]})


def test_checkpoint_roundtrip_keeps_latest(tmp_path):
    for step in (5, 10, 15):
        checkpoint.save_checkpoint(str(tmp_path), step, {"step": step, "w": torch.full((2,), float(step))})
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [10, 15]
    latest = checkpoint.load_latest(str(tmp_path))
    assert latest["step"] == 15 and torch.equal(latest["w"], torch.full((2,), 15.0))
    assert checkpoint.load_latest(str(tmp_path / "missing")) is None


def test_checkpoints_and_resume_on_gcs(tiny_preprocessed, tmp_path, gcs_bucket):  # noqa: F811
    prefix = f"gs://{gcs_bucket}/runs/maml/checkpoints"
    config = {**TINY, "meta_steps": 10, "checkpoint_every": 5, "checkpoint_dir": prefix}
    first = run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "a"))
    assert [step for step, _ in checkpoint.list_checkpoints(prefix)] == [5, 10]
    assert checkpoint.load_latest(prefix)["step"] == 10
    # A second run with resume finds the finished run's checkpoint and only rewrites the outputs.
    again = run_meta_training(str(tiny_preprocessed), "maml", config, f"gs://{gcs_bucket}/runs/maml/model")
    assert again == {**first, "train_seconds": again["train_seconds"]}
    from metarec import storage

    names = {uri.rsplit("/", 1)[1] for uri in storage.list_uris(f"gs://{gcs_bucket}/runs/maml/model")}
    assert {"model.pt", "model.json", "schema.json", "metrics.json"} <= names


def test_resume_refuses_a_checkpoint_saved_with_another_training_config(tiny_preprocessed, tmp_path):
    """Two runs sharing a checkpoint folder: the second must not return the first one's model under its
    own config (it would resume the finished checkpoint and only rewrite model.json)."""
    config = {**TINY, "meta_steps": 10, "checkpoint_every": 5, "checkpoint_dir": str(tmp_path / "ckpt")}
    run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "a"))
    other = {**config, "outer_lr": 0.05, "seed": 1}
    with pytest.raises(
        ValueError, match=r"another training config \(outer_lr: 0.002 != 0.05; seed: 0 != 1\)"
    ):
        run_meta_training(str(tiny_preprocessed), "maml", other, str(tmp_path / "b"))
    assert not (tmp_path / "b" / "model.json").exists()
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path / "ckpt"))] == [5, 10]  # untouched


def test_a_retry_resumes_although_it_checkpoints_logs_or_runs_differently(
    tiny_preprocessed, tmp_path, capsys
):
    config = {**TINY, "meta_steps": 10, "checkpoint_every": 5, "checkpoint_dir": str(tmp_path / "ckpt")}
    first = run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "a"))
    capsys.readouterr()
    retry = {**config, "checkpoint_every": 3, "log_every": 1, "device": "cpu", "cpu_threads": 2}
    again = run_meta_training(str(tiny_preprocessed), "maml", retry, str(tmp_path / "b"))
    assert '"event": "resumed"' in capsys.readouterr().err
    assert again == {**first, "train_seconds": again["train_seconds"]}


def test_a_checkpoint_older_than_a_training_key_resumes_when_the_key_is_at_its_default(
    tiny_preprocessed, tmp_path
):
    directory = tmp_path / "ckpt"
    config = {**TINY, "meta_steps": 10, "checkpoint_every": 5, "checkpoint_dir": str(directory)}
    run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "a"))
    state = checkpoint.load_latest(str(directory))
    del state["config"]["id_dropout"]  # saved before the key existed
    checkpoint.save_checkpoint(str(directory), state["step"], state)
    run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "b"))  # resumes
    with pytest.raises(ValueError, match=r"id_dropout: 0.0 != 0.5"):
        run_meta_training(str(tiny_preprocessed), "maml", {**config, "id_dropout": 0.5}, str(tmp_path / "c"))


def test_a_resumed_run_keeps_the_best_validation_and_the_history_it_had(tiny_preprocessed, tmp_path):
    """The SIGKILL test below kills at the first checkpoint, before any validation, so it cannot see a
    resume that forgets the best validated weights. Here the step-5 checkpoint records a best (mae 0,
    beaten by no later validation) that the resumed run must still return at the end."""
    directory = tmp_path / "ckpt"
    config = {**CHECKPOINTED, "checkpoint_dir": str(directory)}
    run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "a"))
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first["best_step"] in (0, 5, 10) and [v["step"] for v in first["val_history"]] == [0, 5, 10]
    (_, latest), *_ = reversed(checkpoint.list_checkpoints(str(directory)))
    os.remove(latest)  # as if killed after the step-5 checkpoint
    state = checkpoint.load_latest(str(directory))
    assert state["step"] == 5 and len(state["val_history"]) == 2
    # Weights no run reaches (integer buffers, as the catalogue's warm index, stay as they are).
    kept = {
        name: tensor + 0.25 if tensor.is_floating_point() else tensor
        for name, tensor in state["model"].items()
    }
    state["best"] = {
        "mae": 0.0,
        "step": 5,
        "state": kept,
        "metrics": {"mae": 0.0, "rmse": 0.0, "ndcg@3": 1.0},
    }
    checkpoint.save_checkpoint(str(directory), 5, state)

    run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "b"))
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert resumed["best_step"] == 5 and resumed["val_mae"] == 0.0
    assert resumed["val_history"] == first["val_history"] and resumed["curve"] == first["curve"]
    weights = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    for name, tensor in kept.items():
        assert torch.equal(weights[name], tensor), name


def _train_command(preprocessed, output, config_file, resume=True):
    command = [sys.executable, "-m", "metarec.training", "--preprocessed", str(preprocessed), "--method", "maml",
               "--output", str(output), "--config", str(config_file)]  # fmt: skip
    return command if resume else command + ["--no-resume"]


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_preprocessed, tmp_path):
    config = {**TINY, "meta_steps": 120, "checkpoint_every": 5, "val_every": 40, "ema": 0.9}
    config_file = tmp_path / "train.json"  # JSON is valid YAML
    config_file.write_text(json.dumps({"train": config}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(_train_command(tiny_preprocessed, reference, config_file, resume=False), env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip

    process = subprocess.Popen(_train_command(tiny_preprocessed, interrupted, config_file), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not checkpoint.list_checkpoints(str(interrupted / "checkpoints")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    killed_at = checkpoint.list_checkpoints(str(interrupted / "checkpoints"))[-1][0]
    assert killed_at < 120 and not (interrupted / "model.pt").exists()

    finished = subprocess.run(_train_command(tiny_preprocessed, interrupted, config_file), env=env, check=True,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert '"event": "resumed"' in finished.stderr
    for name in ("model.pt",):
        expected = torch.load(reference / name, weights_only=True)
        actual = torch.load(interrupted / name, weights_only=True)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key
    # The final (not only the best) weights and the whole training curve match bitwise too.
    final_expected = checkpoint.load_latest(str(reference / "checkpoints"))
    final_actual = checkpoint.load_latest(str(interrupted / "checkpoints"))
    assert final_actual["step"] == final_expected["step"] == 120
    for key, tensor in final_expected["model"].items():
        assert torch.equal(final_actual["model"][key], tensor), key
    assert final_actual["curve"] == final_expected["curve"]
    for key, tensor in final_expected["ema"].items():
        assert torch.equal(final_actual["ema"][key], tensor), key


def test_default_model_has_an_adapted_user_bias_and_data_initialised_item_bias(tiny_preprocessed):
    from metarec.model import adapted_parameter_names
    from metarec.model_init import build_model
    from metarec.tasks import Preprocessed

    pre = Preprocessed.load(str(tiny_preprocessed))
    settings = TrainSettings()
    model = build_model(pre, settings)
    assert model.user_bias is not None and model.user_bias_prior == settings.user_bias_prior
    assert "user_bias" in adapted_parameter_names(model, settings.adapt_mode)
    table = build_model(pre, settings.replace(item_content=False)).item_bias.weight.detach().squeeze(-1)
    assert float(table[0]) == 0.0 and float(table[1:].abs().max()) > 0  # cold row 0, warm rows fitted
    plain = build_model(pre, TrainSettings(item_bias_init=False))
    assert float(plain.item_bias.weight.detach().abs().max()) == 0.0


def test_content_terms_start_at_a_fit_that_keeps_warm_items_and_tells_cold_items_apart(tiny_preprocessed):
    from metarec.model_init import build_model
    from metarec.tasks import Preprocessed

    pre = Preprocessed.load(str(tiny_preprocessed))
    without = build_model(pre, TrainSettings(item_content=False))
    model = build_model(pre, TrainSettings())
    assert model.item_bias_content is not None and model.item_factors_content is not None
    items = torch.arange(model.n_items)
    warm = pre.item_warm_idx > 0
    with torch.no_grad():
        offsets, plain_offsets = model.item_offset(items), without.item_offset(items)
        factors, plain_factors = model.item_factor_rows(items), without.item_factor_rows(items)
    # Every warm item keeps what the MF start gave it: the id rows hold the fit's residuals.
    torch.testing.assert_close(offsets[warm], plain_offsets[warm], atol=1e-5, rtol=0)
    torch.testing.assert_close(factors[warm], plain_factors[warm], atol=1e-5, rtol=0)
    # Without content every cold item shares row 0; with it, items whose features differ differ.
    cold = items[~warm]
    assert len(cold) > 1 and float(plain_offsets[cold].std()) == 0.0
    design = model.content_design(cold)
    differs = (design[:, None] != design[None]).any(-1)
    assert bool(differs.any())
    spread = (offsets[cold][:, None] - offsets[cold][None]).abs()
    assert float(spread[differs].max()) > 1e-4


def test_item_factors_start_from_an_mf_fit_that_already_personalises(tmp_path):
    from metarec.meta import AdaptSettings
    from metarec.model_init import build_model
    from metarec.preprocessing import run_preprocessing
    from metarec.tasks import Preprocessed, scenario_tasks
    from metarec.trainer import validate

    # The default synthetic set (600 users): its ratings come from latent tastes that MF can recover.
    run_preprocessing("synthetic", None, None, str(tmp_path / "pre"))
    pre = Preprocessed.load(str(tmp_path / "pre"))
    _, batch = scenario_tasks(pre, "user_cold", users_split="train")
    config = {"user_factors": 4, "user_factor_prior": 1.0, "item_content": False}  # the MF start alone
    torch.manual_seed(0)
    fitted = build_model(pre, TrainSettings.from_dict(config))
    torch.manual_seed(0)
    random = build_model(pre, TrainSettings.from_dict({**config, "item_factor_init": False}))
    table = fitted.item_factors.weight.detach()
    assert float(table[0].abs().max()) == 0.0 and float(table[1:].abs().max()) > 0  # cold row 0
    # Before any meta-step, adapting only the user terms (inner lr 0) on the support rows predicts the
    # train users' held-out query rows better with the MF item side than with random item factors
    # (measured: MAE 0.698 vs 0.743).
    user_terms_only = AdaptSettings(mode="head", inner_steps=3, inner_lr=0.0)
    with_mf = validate(fitted, batch, user_terms_only)
    without = validate(random, batch, user_terms_only)
    assert with_mf["mae"] < without["mae"] - 0.02, (with_mf, without)
    assert with_mf["ndcg@3"] > without["ndcg@3"], (with_mf, without)


@pytest.mark.parametrize("val_every", [0, 5])
def test_a_diverged_run_stops_with_a_clear_error_and_ships_no_nan_weights(
    tiny_preprocessed, tmp_path, monkeypatch, val_every
):
    """A meta-gradient turning NaN at step 3 used to spread through every weight; with val_every 0 the
    run then exited normally and shipped a model.pt of NaN (val_mae NaN)."""
    from metarec.meta.learners import MetaLearner

    original, calls = MetaLearner.meta_gradient, []

    def diverging(self, *args, **kwargs):
        loss, grads = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:
            grads = {name: grad * float("nan") for name, grad in grads.items()}
        return loss, grads

    monkeypatch.setattr(MetaLearner, "meta_gradient", diverging)
    directory = tmp_path / "ckpt"
    config = {**TINY, "meta_steps": 10, "checkpoint_every": 1, "val_every": val_every,
              "checkpoint_dir": str(directory)}  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"diverged at meta-step 3/10.*Lower outer_lr"):
        run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "model"), resume=False)
    assert not (tmp_path / "model" / "model.pt").exists()
    latest = checkpoint.load_latest(str(directory))
    assert latest["step"] == 2  # the last finite state, for a retry with other settings to inspect
    for name, tensor in [*latest["model"].items(), *latest["ema"].items()]:
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), name


def test_a_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tiny_preprocessed, tmp_path):
    """The rename is atomic against a killed process, but a node losing power after it (no fsync) can
    leave a truncated ckpt file; every retry then failed on it with torch's zip error instead of
    resuming the kept previous checkpoint."""
    directory = tmp_path / "ckpt"
    config = {**CHECKPOINTED, "checkpoint_dir": str(directory)}
    first = run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "a"), resume=False)
    (_, older), (_, newest) = checkpoint.list_checkpoints(str(directory))
    data = open(newest, "rb").read()
    with open(newest, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"ckpt-00000010.pt is unreadable.*previous checkpoint"):
        assert checkpoint.load_latest(str(directory))["step"] == 5
    with pytest.warns(UserWarning):
        again = run_meta_training(str(tiny_preprocessed), "maml", config, str(tmp_path / "b"))
    assert again == {**first, "train_seconds": again["train_seconds"]}  # the same run, resumed at step 5
    open(older, "wb").close()  # nothing readable left: say which file, do not start over silently
    os.remove(checkpoint.list_checkpoints(str(directory))[-1][1])
    with pytest.raises(checkpoint.CorruptCheckpointError, match="ckpt-00000005.pt is unreadable"):
        checkpoint.load_latest(str(directory))
