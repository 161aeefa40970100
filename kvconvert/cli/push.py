"""`kvconvert push`."""

from __future__ import annotations

from pathlib import Path

import typer

from kvconvert.cli import app
from kvconvert.hub import PushRequest, push, token_source, upload_plan

Directory = typer.Argument(..., help="A converted checkpoint directory (the output of `compress`).")
RepoId = typer.Argument(..., help="NAMESPACE/NAME of the Hub model repository (created if missing).")


@app.command("push")
def push_command(
    directory: Path = Directory,
    repo_id: str = RepoId,
    private: bool = typer.Option(False, "--private", help="Create the repository private (refused if it is public)."),
    revision: str = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
    commit_message: str = typer.Option(None, "--commit-message", help="Commit title (default: what was converted)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of pushing to a branch."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List exactly what would be uploaded; no network, no token."),
) -> None:
    """Upload DIRECTORY to the Hub with huggingface_hub; the token comes from HF_TOKEN or `hf auth login`."""
    req = PushRequest(directory, repo_id, private, revision, commit_message, create_pr)
    if dry_run:
        files = upload_plan(req)
        where = f"{repo_id} ({'private' if private else 'public if new'})"
        target = "a new pull request" if create_pr else f"branch {revision or 'main'}"
        print(f"would upload {len(files)} files, {sum(f.size for f in files):,} bytes, to {where}, {target}:")
        for f in files:
            print(f"{f.size:>16,}  {f.path}")
        print(f"token: {token_source() or 'none found (set HF_TOKEN or run `hf auth login`)'}")
        return
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # uploads are long: show the client's own progress
    result = push(req)
    print(f"pushed {len(result.files)} files to {result.repo_id}: {result.pr_url or result.commit_url}")
