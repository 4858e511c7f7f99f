"""Redaction: secrets taken out of an action before it is validated, encoded, hashed and signed.

Each ``[[redact]]`` rule (``config.RedactRule``) names either field paths or a
regular expression:

- a path (``metadata.api_key``, ``arguments.*``, ``result.value.token``) is a
  list of keys from the action's top level; ``*`` matches any one key or list
  index, a number matches that list index (or that key). There is no ``**``: a
  pattern rule is the way to find a secret anywhere. The whole value at a path
  is replaced, whatever its JSON type.
- a pattern is searched in every string value anywhere in the action (not in
  object keys); only the matched span is replaced, so the rest of a log line
  stays readable.

The replacement is the string ``[redacted:NAME]``, or with ``hash = true``
``[redacted:NAME:hmac-sha256:HEX]``: HMAC-SHA256, under the ledger's redaction
key, of the secret's UTF-8 bytes (of its canonical JSON for a non-string path
value). Equal secrets give equal placeholders in one ledger, so they can be
correlated without being revealed; another ledger's key gives other digests.

Path rules win over pattern rules (a value replaced by a path is not searched);
pattern rules apply in configuration order, each to the result of the ones
before. The action is walked once; containers are copied only where something
was replaced, so an action without secrets comes back as the same object.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ccos_obsd.config import RedactRule
from ccos_obsd.errors import NotCanonicalizable
from ccos_obsd.ledger.canonical import canonical_bytes

KEY_BYTES = 32
"""Size of the redaction key (``redact.key`` in the state dir)."""


def placeholder(name: str, digest: str | None = None) -> str:
    """The string a redacted value becomes: ``[redacted:NAME]`` or ``[redacted:NAME:hmac-sha256:HEX]``."""
    return f"[redacted:{name}]" if digest is None else f"[redacted:{name}:hmac-sha256:{digest}]"


@dataclass(slots=True)
class _PathNode:
    """One step of the path rules' trie: where each key (or ``*``) leads, and the rule that ends here."""

    children: dict[str, _PathNode] = field(default_factory=dict)
    star: _PathNode | None = None
    rule: int | None = None
    """Index (in configuration order) of the first path rule that ends at this node."""


_Edge = tuple["_PathState | None", "int | None"]
"""Where a key leads: the path state below it (None: no path goes on), and the rule that ends there."""


@dataclass(slots=True)
class _PathState:
    """The trie nodes a value's position can be at (several when ``*`` and a key both match), as one state.

    Built once per rule set, so the walk takes one dict look-up per key.
    """

    next: dict[str, _Edge] = field(default_factory=dict)
    other: _Edge = (None, None)
    """The edge of every key not in ``next`` (only ``*`` matches it)."""


_SCALARS = (int, float, bool, type(None))
SCREEN_MAX_CHARS = 128
"""Strings up to this long are screened with all patterns at once (see :func:`_screen`)."""


class Redactor:
    """A set of rules, compiled: :meth:`redact` applies them all in one walk of an action."""

    def __init__(self, rules: Sequence[RedactRule], key: bytes | None = None) -> None:
        """``key`` is the HMAC key; it is needed only when a rule has ``hash = true``."""
        if key is None and any(rule.hash for rule in rules):
            raise ValueError("a rule with hash = true needs the redaction key")
        self._names = [rule.name for rule in rules]
        self._mac = None if key is None else hmac.new(key, digestmod=hashlib.sha256)
        self._paths = _compile_paths(rules)
        self._plain = [placeholder(rule.name) for rule in rules]
        self._hashed = [rule.hash for rule in rules]
        self._searches = [(index, rule.pattern.search, rule.pattern) for index, rule in enumerate(rules)
                          if rule.pattern is not None]
        self._screen = _screen([pattern for _, _, pattern in self._searches])

    def redact(self, action: Any) -> tuple[Any, dict[str, int]]:
        """``action`` with every secret replaced, and how many values or spans each rule replaced.

        Pure: ``action`` itself is not changed; it comes back as is when nothing matched.
        """
        counts: dict[str, int] = {}
        if self._paths is None and not self._searches:
            return action, counts
        return self._walk(action, self._paths, counts), counts

    def _walk(self, value: Any, state: _PathState | None, counts: dict[str, int]) -> Any:
        """``value`` redacted; ``state`` says which path rules can still match below it."""
        if isinstance(value, str):
            return self._scan(value, counts) if self._searches else value
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            return value
        searching = bool(self._searches)
        copy: Any = None
        for key, child in items:
            if state is None:
                if isinstance(child, _SCALARS):
                    continue  # only a path rule can replace a number, a boolean or null
                new = self._walk(child, None, counts)
            else:
                deeper, rule = state.next.get(key if isinstance(key, str) else str(key), state.other)
                if rule is not None:
                    new = self._replace(rule, child, counts)
                elif deeper is None and not searching:
                    continue
                else:
                    new = self._walk(child, deeper, counts)
            if new is not child:
                if copy is None:
                    copy = dict(value) if isinstance(value, dict) else list(value)
                copy[key] = new
        return value if copy is None else copy

    def _scan(self, text: str, counts: dict[str, int]) -> str:
        screen = self._screen
        if screen is not None and len(text) <= SCREEN_MAX_CHARS and screen(text) is None:
            return text
        for index, search, pattern in self._searches:
            if search(text) is None:  # the common case: no match, no new string
                continue
            if self._hashed[index]:
                text, n = pattern.subn(functools.partial(self._hashed_span, index), text)
            else:
                text, n = pattern.subn(self._plain[index], text)  # names hold no backslash: a literal
            name = self._names[index]
            counts[name] = counts.get(name, 0) + n
        return text

    def _replace(self, index: int, value: Any, counts: dict[str, int]) -> str:
        name = self._names[index]
        counts[name] = counts.get(name, 0) + 1
        return self._hashed_placeholder(index, value) if self._hashed[index] else self._plain[index]

    def _hashed_span(self, index: int, match: re.Match[str]) -> str:
        return self._hashed_placeholder(index, match.group())

    def _hashed_placeholder(self, index: int, secret: Any) -> str:
        assert self._mac is not None  # noqa: S101 - the constructor refuses hash rules without a key
        mac = self._mac.copy()
        mac.update(_secret_bytes(secret))
        return placeholder(self._names[index], mac.hexdigest())


def _compile_paths(rules: Sequence[RedactRule]) -> _PathState | None:
    """The path rules as states over sets of trie nodes (None: no path rules)."""
    root = _PathNode()
    for index, rule in enumerate(rules):
        for path in rule.paths:
            node = root
            for segment in path:
                if segment == "*":
                    node.star = node.star or _PathNode()
                    node = node.star
                else:
                    node = node.children.setdefault(segment, _PathNode())
            if node.rule is None:
                node.rule = index
    states: dict[frozenset[int], _PathState] = {}

    def edge(nodes: list[_PathNode | None]) -> _Edge:
        found = [node for node in nodes if node is not None]
        rules_here = [node.rule for node in found if node.rule is not None]
        return state_of(found), min(rules_here, default=None)

    def state_of(nodes: list[_PathNode]) -> _PathState | None:
        live = [node for node in nodes if node.children or node.star is not None]
        if not live:
            return None
        ident = frozenset(map(id, live))
        if ident not in states:  # a tree has no cycles: each state is built once, from above
            state = states[ident] = _PathState()
            for segment in {segment for node in live for segment in node.children}:
                state.next[segment] = edge([*(node.children.get(segment) for node in live),
                                            *(node.star for node in live)])
            state.other = edge([node.star for node in live])
        return states[ident]

    return state_of([root])


def _screen(patterns: Sequence[re.Pattern[str]]) -> Callable[[str], re.Match[str] | None] | None:
    """One search for "does any pattern match?", for short strings (None: it cannot be built soundly).

    On a short string one call instead of one per pattern is most of the cost (most
    strings are short ids and names); on a long one the patterns' own searches are
    faster, as each skips ahead to its leading literal. The alternation matches
    wherever one of the patterns does only if no pattern has groups (a back-reference
    would point elsewhere) and none sets global flags: otherwise there is no screen.
    """
    if len(patterns) < 2 or any(pattern.groups for pattern in patterns):
        return None
    try:
        return re.compile("|".join(f"(?:{pattern.pattern})" for pattern in patterns)).search
    except re.error:  # a global flag such as (?i) in the middle of the alternation
        return None


def _secret_bytes(secret: Any) -> bytes:
    """What the HMAC covers: a string's UTF-8, another value's canonical JSON."""
    if isinstance(secret, str):
        # surrogatepass: a lone surrogate still hashes (validation refuses it if it stays elsewhere).
        return secret.encode("utf-8", "surrogatepass")
    try:
        return canonical_bytes(secret, keys_checked=True)
    except NotCanonicalizable:
        # A lone surrogate inside: the same JSON with it escaped, still one stable form per value.
        return json.dumps(secret, ensure_ascii=True, sort_keys=True, separators=(",", ":")).encode("ascii")

