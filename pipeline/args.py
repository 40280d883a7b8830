"""How every `weakloc` command parses its flags: one parser class, one help format, one error style.

Help shows each flag's default; a mistake ends in one line with exit code 2 (`weakloc label: error: ...`), with
"did you mean" for a misspelt flag, sub-command or choice.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn, Optional, Sequence


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already names its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if ("default" in text or hidden or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    flag = word.split("=", 1)[0]
    close = difflib.get_close_matches(flag, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unrecognised(flags: Sequence[str], known: Sequence[str]) -> str:
    """'unrecognised flag --outptu (did you mean --output?)' for each flag, joined; one spelling everywhere."""
    return "; ".join(f"unrecognised flag {f}{did_you_mean(f, known)}" for f in flags)


class Parser(argparse.ArgumentParser):
    """argparse with prefix matching off (Beam's --labels would pass for --labels_from_folder), defaults in the
    help, and errors as one line."""

    def __init__(self, prog: str, description: Optional[str] = None, **kw):
        kw.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(prog=prog, description=description, allow_abbrev=False, **kw)

    def option_strings(self) -> list[str]:
        found = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for a in self._actions:  # sub-commands (datasets cluttered-mnist|photos|shapes)
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    found += [s for b in sub._actions for s in b.option_strings if s.startswith("--")]
        return found

    def parse_known_args(self, args=None, namespace=None):
        self._tokens = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._tokens, namespace)

    def parse_args(self, args=None, namespace=None):
        tokens = list(sys.argv[1:] if args is None else args)
        known = set(self.option_strings())
        # Before argparse's own checks, which would first complain that a misspelt required flag is missing.
        wrong = [t for t in tokens if t.startswith("--") and t.split("=", 1)[0] not in known and t != "--"]
        if wrong:
            self.error(unrecognised(wrong, sorted(known)))
        ns, extra = self.parse_known_args(tokens, namespace)
        if extra:
            flags = [e for e in extra if e.startswith("-")]
            if flags:
                self.error(unrecognised(flags, self.option_strings()))
            self.error(f"unexpected arguments {extra}: every value must follow its flag; quote glob patterns "
                       "(--input 'dir/*.jpg')")
        return ns

    def error(self, message: str) -> NoReturn:
        message = message.replace("unrecognized", "unrecognised")
        choice = re.search(r"invalid choice: '([^']*)' \(choose from ([^)]*)\)", message)
        if choice:  # a misspelt sub-command (datasets photo) or choice (--boxes larges)
            hint = did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
            message = message.replace(choice.group(0), choice.group(0) + hint)
        if "arguments are required" in message:
            # A misspelt required flag reads as a missing one: name the misspelling (label passes unknown flags
            # on to Beam, so parse_args's own check never sees them).
            known = self.option_strings()
            wrong = [t for t in getattr(self, "_tokens", []) if t.startswith("--") and t.split("=", 1)[0] not in known
                     and did_you_mean(t, known)]
            if wrong:
                message = f"{unrecognised(wrong, known)}; {message}"
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


# Flags several commands share, declared once and added with argparse's `parents=`.

def annotations_flag() -> argparse.ArgumentParser:
    """--annotations: the run folder that evaluate, report and export read."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--annotations", required=True,
                        help="a `weakloc label` --output folder (local, gs://, s3://)")
    return parent


def ground_truth_flag(use: str, default: str) -> argparse.ArgumentParser:
    """--ground_truth, repeatable: VOC folders, COCO JSON or TFRecord patterns (pipeline/ground_truth.py)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--ground_truth", action="append", metavar="VOC_DIR|COCO.json|TFRECORDS",
                        help=f"{use}; matched to pictures by image id, file name or file stem; repeatable "
                             f"(default: {default})")
    return parent
