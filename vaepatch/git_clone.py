"""Plain git operations on a clone through GitPython: open exactly this work tree, read its commit and
local edits, bring a commit in from a source, check it out. Nothing here knows which upstream it is
(``vaepatch.upstream`` does), and GitPython is imported by the caller's check first.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["open_repo", "head", "modified_files", "has_commit", "bring_commit", "checkout", "tree_at",
           "commit_with_tree"]


def open_repo(path: Path):
    """The git repo whose top level is ``path`` exactly, or None.

    A plain directory inside some other checkout (e.g. third_party/vdvae inside the vaepatch
    repo) must not count as a clone, so parent directories are not searched.
    """
    import git

    try:
        repo = git.Repo(path, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    if repo.bare or repo.working_tree_dir is None:
        return None
    if Path(repo.working_tree_dir).resolve() != path.resolve():
        return None
    return repo


def head(repo) -> str | None:
    try:
        return repo.head.commit.hexsha
    except ValueError:  # no commits yet
        return None


def modified_files(repo) -> list[str]:
    """Tracked files that differ from HEAD (staged or not). Untracked files (``__pycache__``,
    outputs) do not count: they do not change the upstream code we patch."""
    out = repo.git.diff("--name-only", "HEAD", "--")
    return [line for line in out.splitlines() if line]


def has_commit(repo, commit: str) -> bool:
    import git

    try:
        repo.git.cat_file("-e", f"{commit}^{{commit}}")
        return True
    except git.GitCommandError:
        return False


def bring_commit(repo, source: str, commit: str) -> bool:
    """Make ``commit`` present in ``repo`` from ``source``; True if it is there afterwards.

    Fetching a sha directly works with GitHub and local repos (protocol v2); the branch and
    tag fetch is the fallback for servers that refuse it.
    """
    import git

    if has_commit(repo, commit):
        return True
    attempts = [(source, commit),
                ("--tags", source, "+refs/heads/*:refs/remotes/vaepatch-source/*")]
    for args in attempts:
        try:
            repo.git.fetch(*args, env={"GIT_TERMINAL_PROMPT": "0"})
        except git.GitCommandError:
            continue
        if has_commit(repo, commit):
            return True
    return False


def checkout(repo, commit: str) -> None:
    """Detached, forced checkout: also fills the work tree of a ``--no-checkout`` clone."""
    repo.git.checkout("--force", "--detach", commit)


def tree_at(repo, commit: str, path: str) -> str | None:
    """The id of the tree at ``path`` in ``commit`` (``git rev-parse COMMIT:PATH``), or None."""
    import git

    try:
        return repo.git.rev_parse(f"{commit}:{path}")
    except git.GitCommandError:
        return None


def commit_with_tree(repo, path: str, tree: str) -> str | None:
    """The newest commit reachable from any ref whose ``path`` is the tree ``tree``, or None: one pin can
    name the code (a folder's tree) rather than the commit, so a repackaged history is accepted too."""
    import subprocess

    commits = repo.git.rev_list("--all").split()
    # one git call for all of them: "<id> tree <size>" per commit, "<spec> missing" where the path is absent
    answers = subprocess.run(["git", "--git-dir", repo.git_dir, "cat-file", "--batch-check"], check=True, text=True,
                             input="".join(f"{c}:{path}\n" for c in commits), capture_output=True).stdout.splitlines()
    return next((c for c, line in zip(commits, answers) if line.split()[:2] == [tree, "tree"]), None)
