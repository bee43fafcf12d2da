"""`upcycle push`: a thin wrapper over upcycle.hub (attached to the `upcycle` group, see cli.py)."""

from pathlib import Path

import click

from .cli import cli


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private; an existing public repo is refused.")
@click.option("--revision", default=None, help="Branch to push to (created from main when missing).")
@click.option("--commit-message", default=None, help="Commit title (default: 'Upload MoE++ checkpoint with upcycle').")
@click.option("--base-model", default=None,
              help="The source's Hub id for the card's base_model (default: from the card or the provenance).")
@click.option("--exclude", multiple=True, help="Glob of files not to upload; repeat for more.")
@click.option("--dry-run", is_flag=True, help="Print the files, their sizes and the card; no network, no token.")
def push(checkpoint, repo_id, private, revision, commit_message, base_model, exclude, dry_run) -> None:
    """Publish CHECKPOINT to the Hugging Face Hub as REPO_ID, with a refreshed model card.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.
    """
    from .hub import PushOptions, format_plan, plan_push
    from .hub import push as run_push

    options = PushOptions(private=private, revision=revision, commit_message=commit_message, base_model=base_model,
                          exclude=list(exclude))
    plan = plan_push(checkpoint, repo_id, options)
    if dry_run:
        click.echo(format_plan(plan))
        return
    report = run_push(plan)
    click.echo(f"pushed {report.files} files ({report.total_bytes:,} bytes) to {report.url}")
