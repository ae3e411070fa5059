"""Against a real `mlflow server` with basic auth on 127.0.0.1: credentials in the tracking URI work and never
show in a message, and only a missing alias means "no champion" (a failed login stops promotion)."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import free_port, mlflow_server, tracking_at
from cxr import inference, tracking
from cxr.errors import CxrError
from cxr.evaluation import compare
from cxr.inference import CardError, ModelCard, load_logged
from cxr.jobs import predict, promote

PASSWORD = "s3cret-Pass-9876"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    ini = tmp / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp / 'users.db'}\n"
                   f"admin_username = admin\nadmin_password = {PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    with mlflow_server(tmp / "mlflow.db", "--app-name", "basic-auth", env=env) as port:
        yield port


@pytest.mark.scale  # a shared server with logins: `make test-scale` (CI runs it too)
def test_credentials_in_the_tracking_uri_are_used_and_never_printed(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with tracking_at(uri := f"http://admin:{PASSWORD}@127.0.0.1:{server}"):
        assert tracking.setup("creds") == tracking.setup("creds")  # the probe and MLflow's client both logged in
    with tracking_at(f"http://admin:wrong-{PASSWORD}@127.0.0.1:{server}"), pytest.raises(CxrError) as e:
        tracking.setup("creds")
    assert "401" in str(e.value) or "nauthorized" in str(e.value)
    assert PASSWORD not in str(e.value) and "admin:***@127.0.0.1" in str(e.value)
    with tracking_at(uri.replace(str(server), str(free_port()))), pytest.raises(CxrError, match="does not answer") as e:
        tracking.setup("creds")
    assert PASSWORD not in str(e.value)


def test_only_a_missing_alias_means_no_champion(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    good = f"http://admin:{PASSWORD}@127.0.0.1:{server}"
    MlflowClient(good).create_registered_model("m")
    assert promote.champion(MlflowClient(good), "m") is None  # the registry says: no such alias
    with tracking_at(bad := good.replace(PASSWORD, "not-it")), pytest.raises(CxrError, match="nothing was promoted"):
        promote.champion(MlflowClient(bad), "m")


def test_a_model_from_before_the_card_cannot_be_scored_so_a_champion_of_it_is_replaced(tmp_path):
    # What evaluate logged before the model card: a plain dict without fit's draft or a card version.
    model = ModelCard("old", "linear", 8, ("NORMAL", "PNEUMONIA"), "stretch", 8, "none", 0.5, 0.25).build().eval()
    example = np.zeros((2, 1, 8, 8), dtype=np.float32)
    old_card = {"image_size": 8, "fit": "stretch", "classes": ["NORMAL", "PNEUMONIA"], "threshold": 0.5}
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=["torch"],
                                        metadata=old_card)
    probs, card, why, _ = promote.test_probs(info.model_uri, tmp_path)
    assert probs is None and card is None and "has no card and weights file" in why
    with pytest.raises(CardError, match="run `dvc repro` to retrain it"):
        load_logged(info.model_uri)


class Payload(torch.nn.Module):
    """A module whose unpickling runs a command: what a tampered or foreign model version can hold."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_registered_version_that_is_code_is_refused_by_name_and_never_run(tmp_path):
    """Registered models are data: the card and weights file, read as plain tensors. A version whose MLflow
    model is a pickle (another flavor's, or this one's tampered), or whose weights file is one, is refused with
    one line naming the version, by the loader `cxr predict`, promotion and the retrain job share; the marker
    its code would write never appears. The same pickle, unpickled, does write it (the test can fail)."""
    marker = tmp_path / "ran"
    card = ModelCard("evil", "linear", 8, ("NORMAL", "PNEUMONIA"), "stretch", 8, "none", 0.5, 0.25)
    client = MlflowClient()
    with mlflow.start_run():
        # a pickled model with this project's card as metadata and no card and weights file
        pickled = mlflow.pytorch.log_model(Payload(marker), name="model", serialization_format="pickle",
                                           metadata=card.to_dict(), pip_requirements=["torch"])
        # a weights file that is itself a pickle running code
        torch.save({"card": card.to_dict(), "state_dict": Payload(marker)}, tmp_path / inference.WEIGHTS)
        tampered = mlflow.pytorch.log_model(card.build().eval(), name="model2", metadata=card.to_dict(),
                                            serialization_format="pickle", pip_requirements=["torch"],
                                            extra_files=[str(tmp_path / inference.WEIGHTS)])
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(image := tmp_path / "x.png")
    for version, info in enumerate((pickled, tampered), start=1):
        mlflow.register_model(info.model_uri, "evil-model")
        client.set_registered_model_alias("evil-model", "champion", str(version))
        with pytest.raises(CardError) as e:
            load_logged("models:/evil-model@champion")
        assert f"models:/evil-model@champion (version {version}) is refused" in str(e.value)
        assert "\n" not in str(e.value)
        probs, _, why, _ = promote.test_probs("models:/evil-model@champion", tmp_path)
        assert probs is None and "is refused" in why
        with pytest.raises(CardError, match="is refused"):
            predict.predict("models:/evil-model@champion", [image])
        assert not marker.exists()
    out = subprocess.run([sys.executable, "-m", "cxr", "predict", "--model", "models:/evil-model@champion",
                          str(image)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: models:/evil-model@champion (version 2) is refused")
    assert len(out.stderr.strip().splitlines()) == 1 and not marker.exists()
    torch.load(tmp_path / inference.WEIGHTS, weights_only=False)  # what loading the old way did
    assert marker.exists()


def test_links_open_mlflow_in_model_training_mode_and_registry_descriptions_are_plain_text(tmp_path):
    """MLflow 3's UI opens a page in GenAI mode unless its hash route's query says workflowType=machine_learning:
    the parent run's links to its variants and to their comparison, and the printed link to a model version,
    say it. A model version's description is plain text (the versions table shows it raw): the run's words
    without markdown."""
    rows = [{"variant": "mlp", "run_id": "abc", "val_auroc": 0.9}, {"variant": "cnn", "run_id": "def"}]
    note = compare.note(rows, "auroc", "7")
    assert "[mlp](#/experiments/7/runs/abc?workflowType=machine_learning)" in note
    assert "(#/compare-runs?runs=[%22abc%22,%22def%22]&experiments=[%227%22]&workflowType=machine_learning)" in note
    assert promote.version_link("my model", "3") == \
        "http://127.0.0.1:5000/#/models/my%20model/versions/3?workflowType=machine_learning"  # `make ui`'s
    with tracking_at(f"http://admin:{PASSWORD}@127.0.0.1:5055/"):  # a tracking server: its own UI, no password
        assert promote.version_link("m", "1") == "http://127.0.0.1:5055/#/models/m/versions/1?workflowType=" \
                                                  "machine_learning"
    said = ("**mlp**: `mlp` from scratch, 32 px. Data: src (imagefolder), 192 train / 48 val images.\n\nTest (240 "
            "images) at threshold 0.374: accuracy 0.838 [0.784–0.888]; see [the run](#/experiments/7/runs/abc)")
    with mlflow.start_run(tags={tracking.NOTE: said}) as run:
        model = ModelCard("mlp", "linear", 8, ("NORMAL", "PNEUMONIA"), "stretch", 8, "none", 0.5, 0.25).build()
        info = mlflow.pytorch.log_model(model.eval(), name="model", pip_requirements=["torch"],
                                        input_example=np.zeros((1, 1, 8, 8), dtype=np.float32))
    client = MlflowClient()
    version = promote._register(client, "plain-words", {"model_uri": info.model_uri, "variant": "mlp",
                                                         "run_id": run.info.run_id})
    assert client.get_model_version("plain-words", version).description == (
        "mlp: mlp from scratch, 32 px. Data: src (imagefolder), 192 train / 48 val images.\n\nTest (240 images) at "
        "threshold 0.374: accuracy 0.838 [0.784–0.888]; see the run (#/experiments/7/runs/abc)")
