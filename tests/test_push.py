"""`upcycle push` through huggingface_hub's own HfApi, with only the HTTP transport replaced by a fake Hub.

huggingface_hub sends every request through one shared httpx2 client (`get_session`); `set_client_factory`
swaps in a client whose transport is `FakeHub`, so whoami, create_repo, create_branch, upload_folder (preupload,
LFS batch, the LFS PUT, the commit) all run their real code. Xet uploads happen in Rust, outside that client, so
these tests turn Xet off and huggingface_hub takes its plain-HTTP LFS path.
"""

import base64
import hashlib
import json
import logging
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from cli_runner import run_cli
from huggingface_hub import constants
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

TOKEN = "hf_upcycleTestToken0123456789abcdefXYZ"
ENDPOINT = "https://huggingface.co"
LFS_HOST = "https://lfs.fake-hub.test"


class FakeHub:
    """Answers the Hub endpoints a folder upload uses; records what it was sent."""

    def __init__(self, existing: dict[str, bool] | None = None, fail: dict[str, int] | None = None,
                 offline: bool = False):
        self.repos = dict(existing or {})  # repo id -> private
        self.fail = fail or {}  # path fragment -> HTTP status to answer instead
        self.offline = offline
        self.requests: list[httpx2.Request] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.lfs_uploads: dict[str, bytes] = {}  # sha256 -> bytes
        self.commits: list[dict] = []  # {"revision", "header", "files": {path: bytes or sha256}, "deleted"}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if self.offline:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        self.requests.append(request)
        path = request.url.path
        for fragment, status in self.fail.items():
            if fragment in path:
                return httpx2.Response(status, json={"error": f"fake failure on {fragment}"})
        body = request.content
        if path == "/api/whoami-v2":
            return httpx2.Response(200, json={"name": "tester", "type": "user", "orgs": []})
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.created.append(payload)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = {"url": f"{ENDPOINT}/{repo_id}"}
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", **url})
            self.repos[repo_id] = payload.get("visibility") == "private"
            return httpx2.Response(200, json=url)
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": obj["oid"], "size": obj["size"],
                 "actions": {"upload": {"href": f"{LFS_HOST}/upload/{obj['oid']}"}}} for obj in objects]})
        if request.url.host == "lfs.fake-hub.test":
            self.lfs_uploads[path.rsplit("/", 1)[1]] = body
            return httpx2.Response(200)
        if path.startswith("/api/models/"):
            return self._repo_endpoint(path.removeprefix("/api/models/"), body)
        return httpx2.Response(404, json={"error": f"the fake Hub does not know {request.method} {path}"})

    def _repo_endpoint(self, rest: str, body: bytes) -> httpx2.Response:
        parts = rest.split("/")
        repo_id, action, revision = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", "/".join(parts[3:])
        if repo_id not in self.repos:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "not found"})
        if action == "":
            return httpx2.Response(200, json={"id": repo_id, "private": self.repos[repo_id], "sha": "0" * 40})
        if action == "branch":
            self.branches.append((repo_id, revision))
            return httpx2.Response(200, json={})
        if action == "tree":
            return httpx2.Response(200, json=[])
        if action == "preupload":
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": file["path"], "uploadMode": "lfs" if file["path"].endswith(".safetensors") else "regular",
                 "shouldIgnore": False, "oid": None} for file in files]})
        if action == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines()]
            commit = {"repo_id": repo_id, "revision": revision, "header": lines[0]["value"], "files": {},
                      "deleted": []}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    commit["files"][value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    commit["files"][value["path"]] = value["oid"]
                else:
                    commit["deleted"].append(value["path"])
            self.commits.append(commit)
            return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{'a' * 40}",
                                              "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": f"unknown action {action}"})


class RecordAllLogs(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + " " + repr(record.args))


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A token in HF_TOKEN, HF_HOME under tmp_path, Xet off, debug logging captured everywhere."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # also logs each request as curl (headers included)
    monkeypatch.setattr(constants, "ENDPOINT", ENDPOINT)
    handler = RecordAllLogs()
    loggers = [logging.getLogger(name) for name in ("", "huggingface_hub", "httpx2", "httpcore", "upcycle")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def use_fake_hub(hub: FakeHub) -> None:
    def client_factory() -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(hub), event_hooks={"request": [hf_request_event_hook]},
                             follow_redirects=True)

    huggingface_hub.set_client_factory(client_factory)  # the autouse fixture below puts the real one back


@pytest.fixture(autouse=True)
def restore_real_client():
    yield
    huggingface_hub.set_client_factory(default_client_factory)


@pytest.fixture
def checkpoint(converted, tmp_path) -> Path:
    """A private copy of the converted tiny checkpoint (push rewrites its README.md)."""
    return Path(shutil.copytree(converted, tmp_path / "checkpoint"))


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def assert_token_nowhere(result, logs: RecordAllLogs, *folders: Path) -> None:
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert logs.messages, "the log capture saw nothing, so it proves nothing"
    assert not [message for message in logs.messages if TOKEN in message]
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"the token was written to {path}"


@pytest.mark.parametrize("private", [False, True])
def test_push_uploads_the_checkpoint_through_hfapi(capsys, monkeypatch, tmp_path, hub_env, checkpoint, private):
    hub = FakeHub()
    use_fake_hub(hub)
    args = ["push", checkpoint, "tester/tiny-moepp", "--commit-message", "first upload"]
    result = run_cli(capsys, *args, *(["--private"] if private else []))

    assert result.exit_code == 0, result.stderr
    assert hub.created == [{"name": "tiny-moepp", "organization": "tester", "type": "model",
                            "visibility": "private" if private else "public"}]
    api_calls = [request for request in hub.requests if request.url.path.split("/")[2:3] in (["whoami-v2"],
                 ["repos"], ["models"])]
    assert len(api_calls) >= 4 and all(request.headers["authorization"] == f"Bearer {TOKEN}" for request in api_calls)
    [commit] = hub.commits
    assert commit["header"]["summary"] == "first upload" and commit["revision"] == "main"
    local = checkpoint_files(checkpoint)
    assert set(commit["files"]) == set(local)  # README.md included, refreshed before the upload
    for path, sent in commit["files"].items():
        if path.endswith(".safetensors"):  # LFS: the commit names the sha256, the bytes went to the LFS PUT
            assert sent == hashlib.sha256(local[path]).hexdigest() and hub.lfs_uploads[sent] == local[path]
        else:
            assert sent == local[path], path
    assert b"tester/tiny-moepp" in local["README.md"]  # the card's snippet loads the pushed repo
    assert result.stdout.strip() == f"pushed {len(local)} files ({sum(map(len, local.values())):,} bytes) to " \
                                    f"{ENDPOINT}/tester/tiny-moepp"
    assert_token_nowhere(result, hub_env, checkpoint, tmp_path)


def test_push_to_a_new_branch_of_an_existing_repo(capsys, monkeypatch, tmp_path, hub_env, checkpoint):
    hub = FakeHub(existing={"tester/tiny-moepp": False})
    use_fake_hub(hub)
    result = run_cli(capsys, "push", checkpoint, "tiny-moepp", "--revision", "budget-1.0")  # namespace from whoami

    assert result.exit_code == 0, result.stderr
    assert hub.branches == [("tester/tiny-moepp", "budget-1.0")]
    assert [commit["revision"] for commit in hub.commits] == ["budget-1.0"]
    assert result.stdout.strip().endswith(f"{ENDPOINT}/tester/tiny-moepp/tree/budget-1.0")
    assert_token_nowhere(result, hub_env, checkpoint, tmp_path)


def test_private_push_refuses_an_existing_public_repo(capsys, monkeypatch, hub_env, checkpoint):
    hub = FakeHub(existing={"tester/tiny-moepp": False})
    use_fake_hub(hub)
    result = run_cli(capsys, "push", checkpoint, "tester/tiny-moepp", "--private")

    assert result.exit_code == 1
    assert "already exists and is public" in result.stderr and result.stdout == ""
    assert hub.commits == [] and hub.lfs_uploads == {}


def test_offline_push_fails_in_one_sentence(capsys, monkeypatch, tmp_path, hub_env, checkpoint):
    before = checkpoint_files(checkpoint)
    use_fake_hub(FakeHub(offline=True))
    result = run_cli(capsys, "push", checkpoint, "tester/tiny-moepp")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot reach the Hub")
    assert "Traceback" not in result.stderr and "pushed" not in result.stderr
    assert checkpoint_files(checkpoint) == before
    assert_token_nowhere(result, hub_env, checkpoint, tmp_path)


@pytest.mark.parametrize("fail, expected", [
    ("/commit/", "the Hub refused the upload to tester/tiny-moepp (HTTP 403: fake failure on /commit/)"),
    ("/api/whoami-v2", "the Hub rejected the token while checking the token (HTTP 401)"),
    ("/api/repos/create", "the Hub refused creating the repo tester/tiny-moepp (HTTP 403"),
])
def test_http_errors_fail_in_one_sentence(capsys, monkeypatch, tmp_path, hub_env, checkpoint, fail, expected):
    status = 401 if "whoami" in fail else 403
    use_fake_hub(FakeHub(fail={fail: status}))
    result = run_cli(capsys, "push", checkpoint, "tester/tiny-moepp")

    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert_token_nowhere(result, hub_env, checkpoint, tmp_path)


def test_missing_token_fails_before_any_request(capsys, monkeypatch, tmp_path, hub_env, checkpoint):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    hub = FakeHub()
    use_fake_hub(hub)
    result = run_cli(capsys, "push", checkpoint, "tester/tiny-moepp")

    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again\n"
    assert hub.requests == []


@pytest.mark.parametrize("args, message", [
    (["tester/bad--name"], "is not a repo name the Hub accepts"),
    (["a/b/c"], "is not a repo name the Hub accepts"),
    (["tester/ok", "--revision", "bad branch"], "is not a branch name the Hub accepts"),
    (["tester/ok", "--base-model", "not a model"], "is not a base model id the Hub accepts"),
])
def test_bad_names_fail_before_any_request(capsys, monkeypatch, hub_env, checkpoint, args, message):
    hub = FakeHub()
    use_fake_hub(hub)
    result = run_cli(capsys, "push", checkpoint, *args)

    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1
    assert hub.requests == []


def test_push_refuses_a_folder_upcycle_did_not_write(capsys, monkeypatch, hub_env, per_expert_source):
    hub = FakeHub()
    use_fake_hub(hub)
    result = run_cli(capsys, "push", per_expert_source, "tester/tiny")

    assert result.exit_code == 1 and "is not an upcycle output folder" in result.stderr
    assert hub.requests == []


def test_dry_run_lists_files_and_card_without_network_or_token(capsys, monkeypatch, hub_env, checkpoint):
    monkeypatch.delenv("HF_TOKEN")
    hub = FakeHub(offline=True)
    use_fake_hub(hub)
    before = checkpoint_files(checkpoint)
    result = run_cli(capsys, "push", checkpoint, "tester/tiny-moepp", "--dry-run", "--base-model",
                     "mistralai/Mixtral-8x7B-v0.1")

    assert result.exit_code == 0, result.stderr
    assert hub.requests == []
    assert checkpoint_files(checkpoint) == before  # nothing written, not even the card
    listing, card = result.stdout.split("--- README.md ---\n")
    for path, data in before.items():
        if path != "README.md":
            assert f"{path} " in listing and f"{len(data):,} bytes" in listing
    assert f"{len(before)} files" in listing
    assert "base_model: mistralai/Mixtral-8x7B-v0.1" in card and "library_name: transformers" in card


def test_big_folders_take_the_resumable_large_folder_path_where_huggingface_hub_has_one(monkeypatch, checkpoint):
    """upload_large_folder (huggingface_hub 1.x) above LARGE_FOLDER_BYTES; without it, upload_folder (which resumes)."""
    from upcycle.publish import push as hub

    calls = []

    class HubWithLargeFolder:
        def upload_large_folder(self, **kwargs):
            calls.append(("upload_large_folder", kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    plan = hub.plan_push(checkpoint, "tester/tiny-moepp", hub.PushOptions(private=True, revision="b"))
    monkeypatch.setattr(hub, "LARGE_FOLDER_BYTES", plan.total_bytes)
    assert hub.upload(HubWithLargeFolder(), plan, "tester/tiny-moepp") is None
    monkeypatch.setattr(hub, "LARGE_FOLDER_BYTES", plan.total_bytes + 1)
    hub.upload(HubWithLargeFolder(), plan, "tester/tiny-moepp")
    (large, large_args), (small, small_args) = calls
    assert large == "upload_large_folder" and large_args["private"] and large_args["revision"] == "b"
    assert small == "upload_folder" and small_args["delete_patterns"] == hub.STALE_WEIGHT_PATTERNS
