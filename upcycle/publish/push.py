"""`upcycle push`: publish a checkpoint folder to the Hugging Face Hub with a fresh model card.

Everything a user can get wrong is checked before the first request: the folder is an upcycle output, the repo
name and branch are names the Hub accepts, a token exists, offline mode is off. The network part then runs
through huggingface_hub's HfApi (whoami, create_repo, create_branch, upload_folder), and every way it can fail
(no connection, a refused token, an HTTP error) becomes one UpcycleError sentence. The token is handed to HfApi
and nowhere else: it is never printed, logged or written, and it is scrubbed from any message the Hub echoes.
"""

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub import errors as hub_error_types
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    filter_repo_objects,
    validate_repo_id,
)

from ..checkpoint.model_card import CARD_FILE, build_model_card
from ..checkpoint.provenance import PROVENANCE_FILE, read_provenance
from ..errors import UpcycleError

try:  # huggingface_hub >= 2 talks HTTP through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http

# get_token raises only when the user opted into an OIDC token exchange (HF_OIDC_RESOURCE) and it failed.
TOKEN_ERRORS = (OSError, *filter(None, [getattr(hub_error_types, "OIDCError", None)]))
TRANSPORT_ERRORS = (_http.TransportError, ConnectionError, TimeoutError)
# Weight files on the Hub that the folder no longer has would be loaded beside (or instead of) the new ones
# (a stale model.safetensors wins over a new index), so the commit deletes them; other remote files stay.
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
# Versions of huggingface_hub that have upload_large_folder (1.x) get it above this size: it resumes. The 2.x
# installed here has none; its upload_folder commits big folders in batches and resumes when re-run.
LARGE_FOLDER_BYTES = 5 * 1024**3
BRANCH_NAME = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*\.lock$)[A-Za-z0-9._/-]+(?<![/.])$")
MAX_DETAIL_CHARS = 200


@dataclass
class PushOptions:
    private: bool = False
    revision: str | None = None  # branch; created from main when missing
    commit_message: str | None = None
    base_model: str | None = None  # the source's Hub id for the card (default: the card's or the provenance's)
    exclude: list[str] = field(default_factory=list)  # glob patterns of files not to upload


@dataclass
class PushPlan:
    checkpoint: Path
    repo_id: str
    options: PushOptions
    card: ModelCard
    files: dict[str, int]  # path in the repo -> bytes (README.md at the size of the refreshed card)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


@dataclass
class PushReport:
    url: str  # the repo (or branch) page
    commit_url: str | None
    files: int
    total_bytes: int


def check_checkpoint(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UpcycleError(f"{checkpoint} is not a folder; give the folder that upcycle wrote")
    missing = [name for name in ("config.json", PROVENANCE_FILE) if not (checkpoint / name).is_file()]
    if missing:
        raise UpcycleError(f"{checkpoint} has no {' or '.join(missing)}, so it is not an upcycle output folder")
    if read_provenance(checkpoint) is None:
        raise UpcycleError(f"{checkpoint / PROVENANCE_FILE} is not valid JSON, so the card cannot say what was done")
    return checkpoint


def check_repo_id(repo_id: str, what: str = "repo name") -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UpcycleError(
            f"{repo_id!r} is not a {what} the Hub accepts: use name or namespace/name with letters, digits, '-', "
            "'_' or '.', at most 96 characters, no '--' or '..', not starting or ending with '-' or '.'"
        ) from None
    return repo_id


def check_branch(revision: str | None) -> None:
    if revision is not None and not BRANCH_NAME.match(revision):
        raise UpcycleError(f"{revision!r} is not a branch name the Hub accepts (letters, digits, '.', '_', '-', '/')")


def folder_files(checkpoint: Path, exclude: list[str]) -> dict[str, int]:
    """The files upload_folder would send (the same ignore rules), with their sizes."""
    paths = sorted(path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*") if path.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *exclude])
    return {path: (checkpoint / path).stat().st_size for path in kept}


def plan_push(checkpoint: Path, repo_id: str, options: PushOptions) -> PushPlan:
    """Validate every input and build the refreshed card in memory; no network, no token, nothing written."""
    checkpoint = check_checkpoint(checkpoint)
    check_repo_id(repo_id)
    check_branch(options.revision)
    if options.base_model is not None:
        check_repo_id(options.base_model, "base model id")
    card = build_model_card(checkpoint, name=repo_id, base_model=options.base_model)
    files = folder_files(checkpoint, options.exclude)
    files[CARD_FILE] = len(str(card).encode())
    return PushPlan(checkpoint, repo_id, options, card, dict(sorted(files.items())))


def format_plan(plan: PushPlan) -> str:
    """What a dry run prints: where, the files with sizes, then the card."""
    visibility = "private" if plan.options.private else "public"
    branch = plan.options.revision or "main"
    width = max(len(path) for path in plan.files)
    lines = [f"would push {plan.checkpoint} to {constants.ENDPOINT}/{plan.repo_id} ({visibility}, branch {branch}):"]
    lines += [f"  {path:<{width}}  {size:>15,} bytes" for path, size in plan.files.items()]
    lines += [f"  {len(plan.files)} files, {plan.total_bytes:,} bytes", "", f"--- {CARD_FILE} ---", str(plan.card)]
    return "\n".join(lines)


def _one_line(text: str, token: str) -> str:
    text = " ".join(str(text).replace(token, "***").split()).rstrip(".")
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


@contextlib.contextmanager
def hub_errors(doing: str, token: str, upload: bool = False) -> Iterator[None]:
    """Turn what the Hub or the network raises while `doing` into one UpcycleError sentence."""
    retry = "; run the same command again to resume" if upload else ""
    try:
        yield
    except OfflineModeIsEnabled:
        raise UpcycleError(f"{doing} needs the network but HF_HUB_OFFLINE is set; unset it to push") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        if status == 401:
            raise UpcycleError(f"the Hub rejected the token while {doing} (HTTP 401); set a valid HF_TOKEN or run "
                               "`hf auth login`") from None
        detail = _one_line(error.server_message or "", token)
        hint = "; the token needs write access to that namespace" if status == 403 else retry
        raise UpcycleError(f"the Hub refused {doing} (HTTP {status}{': ' + detail if detail else ''}){hint}") from None
    except TRANSPORT_ERRORS as error:
        raise UpcycleError(f"cannot reach the Hub at {constants.ENDPOINT} while {doing} ({type(error).__name__}); "
                           f"check the network or proxy{retry or ' and try again'}") from None
    except (ValueError, RuntimeError) as error:
        if not upload:
            raise
        raise UpcycleError(f"{doing} failed ({_one_line(error, token)}){retry}") from None


def _token() -> str:
    try:
        token = get_token()
    except TOKEN_ERRORS as error:
        raise UpcycleError(f"no Hugging Face token could be obtained ({type(error).__name__}); set HF_TOKEN or run "
                           "`hf auth login`") from None
    if not token:
        raise UpcycleError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    return token


def upload(api: HfApi, plan: PushPlan, repo_id: str) -> str | None:
    """Upload the folder; returns the commit URL (None on the 1.x large-folder path, which makes many)."""
    upload_large_folder = getattr(api, "upload_large_folder", None)
    if upload_large_folder is not None and plan.total_bytes >= LARGE_FOLDER_BYTES:
        upload_large_folder(repo_id=repo_id, folder_path=plan.checkpoint, repo_type="model",
                            revision=plan.options.revision, private=plan.options.private,
                            ignore_patterns=plan.options.exclude or None)
        return None
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=plan.checkpoint, repo_type="model", revision=plan.options.revision,
        commit_message=plan.options.commit_message or "Upload MoE++ checkpoint with upcycle",
        ignore_patterns=plan.options.exclude or None, delete_patterns=STALE_WEIGHT_PATTERNS,
    )
    return getattr(commit, "commit_url", None)


def push(plan: PushPlan) -> PushReport:
    """Create the repo (and branch) if needed, refresh README.md in the folder, upload it; raise on any failure."""
    token = _token()
    if constants.is_offline_mode():
        raise UpcycleError("pushing needs the network but HF_HUB_OFFLINE is set; unset it to push")
    api = HfApi(token=token)
    with hub_errors("checking the token", token):
        user = api.whoami()
    repo_id = plan.repo_id if "/" in plan.repo_id else f"{user['name']}/{plan.repo_id}"
    with hub_errors(f"creating the repo {repo_id}", token):
        url = str(api.create_repo(repo_id, repo_type="model", private=plan.options.private, exist_ok=True))
        if plan.options.private and not api.repo_info(repo_id, repo_type="model").private:
            raise UpcycleError(f"{repo_id} already exists and is public; make it private on the Hub first, or push "
                               "without --private")
    if plan.options.revision:
        with hub_errors(f"creating the branch {plan.options.revision} of {repo_id}", token):
            api.create_branch(repo_id, branch=plan.options.revision, repo_type="model", exist_ok=True)
        url = f"{url}/tree/{plan.options.revision}"
    card = build_model_card(plan.checkpoint, name=repo_id, base_model=plan.options.base_model)
    card.save(plan.checkpoint / CARD_FILE)
    with hub_errors(f"the upload to {repo_id}", token, upload=True):
        commit_url = upload(api, plan, repo_id)
    files = folder_files(plan.checkpoint, plan.options.exclude)
    return PushReport(url=url, commit_url=commit_url, files=len(files), total_bytes=sum(files.values()))
