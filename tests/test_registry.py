"""Against a real `mlflow server` with basic auth on 127.0.0.1: credentials in the tracking URI work and never
show in a message, and only a missing alias means "no champion" (a failed login stops promotion)."""

import os

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, mlflow_server, tracking_at
from cxr import registry, tracking
from cxr.errors import CxrError
from cxr.inference import CardError, ModelCard, load_logged

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
    assert registry._champion(MlflowClient(good), "m") is None  # the registry says: no such alias
    with tracking_at(bad := good.replace(PASSWORD, "not-it")), pytest.raises(CxrError, match="nothing was promoted"):
        registry._champion(MlflowClient(bad), "m")


def test_a_model_from_before_the_card_cannot_be_scored_so_a_champion_of_it_is_replaced(tmp_path):
    # What evaluate logged before the model card: a plain dict without fit's draft or a card version.
    model = ModelCard("old", "linear", 8, ("NORMAL", "PNEUMONIA"), "stretch", 8, "none", 0.5, 0.25).build().eval()
    example = np.zeros((2, 1, 8, 8), dtype=np.float32)
    old_card = {"image_size": 8, "fit": "stretch", "classes": ["NORMAL", "PNEUMONIA"], "threshold": 0.5}
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=["torch"],
                                        metadata=old_card)
    probs, card, why = registry.test_probs(info.model_uri, tmp_path)
    assert probs is None and card is None and "has no model card of this version" in why
    with pytest.raises(CardError, match="run `dvc repro` to retrain it"):
        load_logged(info.model_uri)
