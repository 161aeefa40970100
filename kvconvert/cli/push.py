"""`kvconvert push`."""

from __future__ import annotations

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit
from kvconvert.config import PushRequest
from kvconvert.config.base import OUTPUT

OPTIONS = Group(PushRequest, arguments=("directory", "repo_id"))
EXTRA = (
    flag(False, "--dry-run", help="List exactly what would be uploaded; no network, no token.", panel=OUTPUT),
    flag(False, "--json", help="Print a JSON summary.", panel=OUTPUT),
)


@command(app, "push", OPTIONS, extra=EXTRA)
def push_command(req: PushRequest, dry_run: bool, json: bool) -> None:
    """Upload DIRECTORY to the Hub with huggingface_hub; the token comes from HF_TOKEN or `hf auth login`."""
    from kvconvert.hub import push, token_source, upload_plan

    if dry_run:
        files = upload_plan(req)
        listing = [{"path": f.path, "size": f.size} for f in files]
        emit("push", {"dry_run": True, "repo_id": req.repo_id, "files": listing}, json)
        if not json:
            where = f"{req.repo_id} ({'private' if req.private else 'public if new'})"
            target = "a new pull request" if req.create_pr else f"branch {req.revision or 'main'}"
            print(f"would upload {len(files)} files, {sum(f.size for f in files):,} bytes, to {where}, {target}:")
            for f in files:
                print(f"{f.size:>16,}  {f.path}")
            print(f"token: {token_source() or 'none found (set HF_TOKEN or run `hf auth login`)'}")
        return
    from huggingface_hub.utils import enable_progress_bars

    if not json:
        enable_progress_bars()  # uploads are long: show the client's own progress
    result = push(req)
    url = result.pr_url or result.commit_url
    emit("push", {"dry_run": False, "repo_id": result.repo_id, "files": len(result.files), "url": url}, json)
    if not json:
        print(f"pushed {len(result.files)} files to {result.repo_id}: {url}")
