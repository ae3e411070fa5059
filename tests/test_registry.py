"""Against a real `mlflow server` with basic auth on 127.0.0.1: credentials in the tracking URI work and never
show in a message, and only a missing alias means "no champion" (a failed login stops promotion)."""

import os

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, mlflow_server, tracking_at
from cxr import registry, tracking
from cxr.errors import CxrError

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
