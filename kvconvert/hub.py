"""Push a converted checkpoint to the Hugging Face Hub with huggingface_hub (`create_repo`, `upload_folder`).

`upload_folder` streams files from disk: large shards go through Xet (or LFS without hf_xet), and with hf_xet a
large folder is committed in batches that a re-run resumes. The token comes from `HF_TOKEN` or the saved login
(`hf auth login`); it is handed to the client only, and removed from any message kvconvert prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvconvert.card import CARD, card_is_ours, model_card, update_record
from kvconvert.config import PushRequest
from kvconvert.errors import KVConvertError, first_line
from kvconvert.record import RECORD, dump_record, load_record
from kvconvert.tensors import TensorReader

IGNORE_PATTERNS = [".*", "*/.*"]
"""Hidden files and folders (temporary directories, caches, training state) are never uploaded."""


@dataclass(frozen=True)
class UploadFile:
    path: str
    size: int


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    files: tuple[UploadFile, ...]
    commit_url: str
    pr_url: str | None


def check_target(repo_id: str, revision: str | None = None, create_pr: bool = False) -> None:
    """Refuse what the Hub would refuse later: a malformed repo id, or --create-pr with --revision."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise KVConvertError(f"{repo_id!r} is not a valid Hub repo id: {first_line(exc)}") from None
    if "/" not in repo_id:
        raise KVConvertError(f"repo id {repo_id!r} needs a namespace: pass NAMESPACE/{repo_id}")
    if create_pr and revision:
        raise KVConvertError("--create-pr opens a pull request against the default branch; drop --revision")


def check_folder(directory: Path) -> None:
    """A folder worth uploading: config.json and every weight shard present and readable."""
    if not directory.is_dir():
        raise KVConvertError(f"{directory} is not a directory; pass the output directory of `kvconvert compress`")
    if not (directory / "config.json").is_file():
        raise KVConvertError(f"{directory} has no config.json; pass the output directory of `kvconvert compress`")
    TensorReader(directory)


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise KVConvertError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def check_access(repo_id: str, endpoint: str | None = None) -> None:
    """Before long work: a token exists, the Hub accepts it, and the repo's namespace is the user's or an org's."""
    from huggingface_hub import HfApi

    token = require_token()
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, repo_id, api.endpoint):
        me = api.whoami()
    names = [me.get("name")] + [org.get("name") for org in me.get("orgs") or []]
    namespace = repo_id.split("/")[0]
    if namespace not in names:
        raise KVConvertError(
            f"push.repo_id {repo_id} is outside your namespaces ({', '.join(n for n in names if n)}); "
            f"set it with --set push.repo_id={me.get('name')}/{repo_id.split('/')[-1]}"
        )


def upload_plan(req: PushRequest) -> list[UploadFile]:
    """Exactly the files `push` uploads, in order, with their sizes (kvconvert.json and README.md as they will be
    after the repo id is recorded in them). Uses the same file walk and filter as `upload_folder`."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    check_target(req.repo_id, req.revision, req.create_pr)
    check_folder(req.directory)
    root = req.directory.expanduser().resolve()
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    kept = filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    sizes = {path: (root / path).stat().st_size for path in kept}
    if RECORD in sizes:
        old = load_record(root)
        record = old.with_sections(hub={"repo_id": req.repo_id})
        sizes[RECORD] = len(dump_record(record).encode())
        if card_is_ours(root, old):  # re-rendered, or written afresh where README.md is missing
            sizes[CARD] = len(model_card(record).encode())
    return [UploadFile(path, sizes[path]) for path in sorted(sizes)]


def token_source() -> str | None:
    """Where the token would come from (never the token itself): `HF_TOKEN`, `saved login`, or None."""
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    return "saved login" if get_token() else None


def push(req: PushRequest, endpoint: str | None = None) -> PushResult:
    """Create the repository if needed and upload the folder in one `upload_folder` call."""
    from huggingface_hub import HfApi

    files = upload_plan(req)
    token = require_token()
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, req.repo_id, api.endpoint):
        api.create_repo(req.repo_id, private=req.private, exist_ok=True)
        if req.private and not api.repo_info(req.repo_id).private:
            raise KVConvertError(
                f"{req.repo_id} already exists and is public; --private does not change an existing repository: "
                "make it private on the Hub first, or push to a new repository"
            )
        check_foreign_files(api, req, [f.path for f in files])
        if req.revision:
            api.create_branch(req.repo_id, branch=req.revision, exist_ok=True)
        message = req.commit_message or _default_message(req.directory)
        if (req.directory / RECORD).is_file():
            update_record(req.directory, hub={"repo_id": req.repo_id})
        info = api.upload_folder(
            repo_id=req.repo_id,
            folder_path=req.directory,
            commit_message=message,
            revision=req.revision,
            create_pr=req.create_pr,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    return PushResult(req.repo_id, tuple(files), str(info.commit_url), info.pr_url)


KEPT_BY_THE_HUB = {".gitattributes"}
"""Files the Hub writes itself when it creates a repository; replacing them is not replacing the user's work."""


def foreign_files(remote: set[str], planned: list[str]) -> list[str]:
    """The files an upload would replace that kvconvert did not upload: all of the overlap, unless the repository
    already holds a kvconvert record (then its files came from an earlier push, or a resumed one)."""
    if RECORD in remote:
        return []
    return sorted(p for p in planned if p in remote and p not in KEPT_BY_THE_HUB)


def check_foreign_files(api, req: PushRequest, planned: list[str]) -> None:
    """Refuse to replace files of a repository kvconvert did not fill, unless --overwrite (a pull request replaces
    nothing until someone merges it)."""
    if req.overwrite or req.create_pr:
        return
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = api.model_info(req.repo_id, revision=req.revision)
    except RevisionNotFoundError:  # a new branch starts from main
        info = api.model_info(req.repo_id)
    clash = foreign_files({s.rfilename for s in info.siblings or []}, planned)
    if clash:
        shown = ", ".join(clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
        raise KVConvertError(
            f"{req.repo_id} already has {shown}, which kvconvert did not upload; pass --overwrite to replace them, "
            "--create-pr to propose the change, or push to a new repository"
        )


def _default_message(directory: Path) -> str:
    if not (directory / RECORD).is_file():
        return "Upload with kvconvert"
    record = load_record(directory)
    if (kv := record.num_key_value_heads) is None:
        return "Upload with kvconvert"
    return f"kvconvert: {record.name}, {kv.before} -> {kv.after} KV heads"


@contextmanager
def hub_errors(token: str, repo_id: str, endpoint: str) -> Iterator[None]:
    """Turn client errors into one-line KVConvertErrors naming the fix, with the token scrubbed out."""
    from huggingface_hub.errors import HfHubHTTPError

    def clean(exc: BaseException) -> str:
        text = str(exc).replace(token, "***").strip()
        return text.splitlines()[0] if text else type(exc).__name__

    try:
        yield
    except KVConvertError:
        raise
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            msg = "the Hub rejected the token (401): run `hf auth login` or set HF_TOKEN to a valid token"
        elif status == 403:
            msg = f"no write access to {repo_id} (403): use a token with write access there, or --create-pr"
        elif status == 404:
            msg = f"{repo_id} or its revision was not found (404: {clean(exc)}); check the repo id and --revision"
        else:
            msg = f"the Hub refused the upload to {repo_id} ({clean(exc)}); retry, re-running resumes it"
        raise KVConvertError(msg) from None
    except ValueError as exc:  # e.g. README metadata rejected by /api/validate-yaml, malformed responses
        raise KVConvertError(f"the Hub refused the upload to {repo_id}: {clean(exc)}; fix it and push again") from None
    except Exception as exc:  # transport errors (httpx2, OSError) and failed part uploads
        raise KVConvertError(
            f"upload to {repo_id} at {endpoint} failed ({type(exc).__name__}: {clean(exc)}); check the network or "
            "HF_ENDPOINT and run the push again (it resumes)"
        ) from None
