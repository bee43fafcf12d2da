"""Put an unchanged source shard into the output without copying its bytes: a reflink or a hard link.

- reflink (FICLONE ioctl, Linux: Btrfs, XFS, bcachefs, OCFS2...): a new file sharing the source's blocks
  copy-on-write. Instant, and independent of the source afterwards: editing either leaves the other intact.
- hard link: a second name for the same file (same inode). Instant, on any POSIX filesystem, but only within
  one filesystem, and the two names are one file: editing the output shard in place edits the source too (and
  mode and timestamps are shared). Tools that rewrite files by replacing them (save_pretrained, git, rsync
  without --inplace) break the link harmlessly; anything writing in place does not. Therefore only on request.
- copy: handled by the caller (byte for byte, hashing on the way).

Sources in the Hub cache are symlinks to blobs; every mode here links or clones the blob itself, never the
symlink (which would dangle once the cache is cleaned, and whose relative target is wrong from the output).
"""

import errno
import os
import shutil
from pathlib import Path

from ..errors import UpcycleError

LINK_MODES = ("auto", "reflink", "hard", "copy")
FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
REFLINK_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
REFLINK, HARD_LINK = "reflink", "hard link"


def reflink(source: Path, destination: Path) -> bool:
    """Clone `source` into a new `destination`; False (and no destination left) where the filesystem cannot."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return False
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        try:
            fcntl.ioctl(writer.fileno(), FICLONE, reader.fileno())
            cloned = True
        except OSError as error:
            if error.errno not in REFLINK_UNSUPPORTED:
                raise
            cloned = False
    if not cloned:
        os.unlink(destination)
        return False
    shutil.copystat(source, destination)
    return True


def hard_link(source: Path, destination: Path) -> None:
    try:
        os.link(Path(source).resolve(), destination)
    except OSError as error:
        if error.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise UpcycleError(
                f"cannot hard-link {Path(source).name} into the output ({os.strerror(error.errno).lower()}; "
                "hard links need the output on the same filesystem); use --link auto or --link copy"
            ) from error
        raise


def link_file(source: Path, destination: Path, mode: str) -> str | None:
    """Link `source` as `destination` per `mode`; returns REFLINK or HARD_LINK, or None when it must be copied."""
    if mode not in LINK_MODES:
        raise UpcycleError(f"--link must be one of {', '.join(LINK_MODES)}, got {mode!r}")
    source = Path(source).resolve()  # the blob behind a Hub cache symlink
    if mode in ("auto", "reflink"):
        if reflink(source, destination):
            return REFLINK
        if mode == "reflink":
            raise UpcycleError(
                f"the filesystem of {destination.parent} cannot reflink {source.name} (reflinks need Btrfs, XFS or "
                "similar, and the source on the same filesystem); use --link auto, hard or copy"
            )
        return None
    if mode == "hard":
        hard_link(source, destination)
        return HARD_LINK
    return None
