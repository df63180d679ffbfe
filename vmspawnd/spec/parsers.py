# SPDX-License-Identifier: LGPL-2.1-or-later
"""systemd's argument-parsing rules, re-implemented exactly and without I/O.

vmspawnd must accept (and refuse) the same option values as systemd-vmspawn 259, so
each parser here mirrors the systemd helper named in its docstring (parse_size,
parse_boolean, cunescape, extract_first_word, hostname_is_valid, sd_id128_from_string,
vsock_parse_cid, parse_userns_uid_range, unit_name_mangle_with_suffix, ...), including
its corner cases.  Where we deliberately differ, the docstring says so and why.

Conventions:

* Every parser raises :class:`ValueError` whose message names what was wrong and the
  accepted forms; the CLI layer prefixes the option name.
* Text is processed as the UTF-8 bytes systemd would see.  ``str`` values coming from
  ``sys.argv``/``os.environ`` carry undecodable bytes as surrogate escapes; we encode
  with ``surrogateescape`` so those bytes round-trip exactly.
* Nothing here touches the filesystem, the environment or the clock.
"""

from __future__ import annotations

import re
import string
from typing import Literal

__all__ = [
    "parse_size",
    "parse_boolean",
    "parse_tristate",
    "c_unescape",
    "extract_first_word",
    "split_qemu_extra",
    "parse_bind",
    "credential_name_is_valid",
    "parse_credential_id",
    "parse_set_credential",
    "split_load_credential",
    "credential_source_kind",
    "parse_vsock_cid",
    "parse_private_users",
    "is_valid_hostname",
    "hostname_cleanup",
    "default_machine_name",
    "parse_uuid",
    "parse_background",
    "parse_ether_addr",
    "mangle_unit_name",
    "path_simplify",
    "parse_signal",
    "signal_name",
    "parse_smp",
]

# systemd's WHITESPACE (string-util.h) — note: no \v or \f.
_WHITESPACE = " \t\n\r"
# C isspace() in the C locale, which strtoul() skips on its own.
_C_ISSPACE = " \t\n\v\f\r"
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
_UINT32_MAX = 0xFFFFFFFF
_NAME_MAX = 255
_PATH_MAX = 4096
_HOST_NAME_MAX = 64
_HEXDIGITS = "0123456789abcdefABCDEF"


def _encode(text: str, what: str = "value") -> bytes:
    """UTF-8 bytes of ``text``, restoring bytes smuggled in as surrogate escapes."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains characters that cannot be encoded: {text!r}") from None


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------
# Integers (strtoul()/safe_atou*() emulation)
# --------------------------------------------------------------------------------------

_SAFE_ATO_REFUSE_PLUS_MINUS = 1 << 30
_SAFE_ATO_REFUSE_LEADING_ZERO = 1 << 29
_SAFE_ATO_REFUSE_LEADING_WHITESPACE = 1 << 28
_SAFE_ATO_FLAGS = _SAFE_ATO_REFUSE_PLUS_MINUS | _SAFE_ATO_REFUSE_LEADING_ZERO | _SAFE_ATO_REFUSE_LEADING_WHITESPACE


class _RangeError(ValueError):
    """Stands for -ERANGE: the syntax was fine but the value does not fit."""


def _digit_value(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - ord("0")
    if "a" <= ch <= "z":
        return ord(ch) - ord("a") + 10
    if "A" <= ch <= "Z":
        return ord(ch) - ord("A") + 10
    return 99


def _c_strtoul(s: str, base: int) -> tuple[int, int, bool] | None:
    """glibc strtoul()/strtoull() on 64-bit Linux, C locale.

    Returns ``(value, end_index, overflowed)`` or None when no conversion was performed
    (endptr == nptr).  ``value`` is already wrapped the way C wraps a negated result.
    """
    i, n = 0, len(s)
    while i < n and s[i] in _C_ISSPACE:
        i += 1
    negative = False
    if i < n and s[i] in "+-":
        negative = s[i] == "-"
        i += 1
    # "0x" only counts as a prefix when a hex digit follows; otherwise glibc parses the "0".
    has_hex_prefix = i + 2 < n and s[i] == "0" and s[i + 1] in "xX" and _digit_value(s[i + 2]) < 16
    if base == 0:
        if has_hex_prefix:
            base, i = 16, i + 2
        elif i < n and s[i] == "0":
            base = 8
        else:
            base = 10
    elif base == 16 and has_hex_prefix:
        i += 2
    start = i
    value = 0
    overflowed = False
    while i < n and _digit_value(s[i]) < base:
        if not overflowed:  # stop growing the integer once it cannot fit (cheap on huge input)
            value = value * base + _digit_value(s[i])
            overflowed = value > _UINT64_MAX
        i += 1
    if i == start:
        return None
    if overflowed:
        return _UINT64_MAX, i, True
    if negative:
        value = (-value) & _UINT64_MAX
    return value, i, False


def _safe_atou(s: str, base_and_flags: int = 0, bits: int = 32) -> int:
    """systemd safe_atou_full()/safe_atou32_full(): strict unsigned parse, whole string."""
    base = base_and_flags & ~_SAFE_ATO_FLAGS
    if base_and_flags & _SAFE_ATO_REFUSE_LEADING_WHITESPACE and (not s or s[0] in _WHITESPACE):
        raise ValueError("leading whitespace is not allowed")
    s = s.lstrip(_WHITESPACE)
    if base_and_flags & _SAFE_ATO_REFUSE_PLUS_MINUS and s[:1] in ("+", "-"):
        raise ValueError("a sign prefix is not allowed")
    if base_and_flags & _SAFE_ATO_REFUSE_LEADING_ZERO and s.startswith("0") and s != "0":
        raise ValueError("leading zeros are not allowed")
    if base == 0:  # mangle_base(): Python-style 0b/0o prefixes
        if s[:2] in ("0b", "0B"):
            base, s = 2, s[2:]
        elif s[:2] in ("0o", "0O"):
            base, s = 8, s[2:]
    parsed = _c_strtoul(s, base)
    if parsed is None or parsed[1] != len(s):
        raise ValueError("not a number")
    value, _, overflowed = parsed
    if overflowed:
        raise _RangeError("number too large")
    if value != 0 and s[:1] == "-":
        raise _RangeError("negative numbers are not allowed")
    if value >= 1 << bits:
        raise _RangeError(f"number does not fit in {bits} bits")
    return value


# --------------------------------------------------------------------------------------
# parse_size / booleans
# --------------------------------------------------------------------------------------

_IEC_SUFFIXES: tuple[tuple[str, int], ...] = (
    ("E", 1024**6),
    ("P", 1024**5),
    ("T", 1024**4),
    ("G", 1024**3),
    ("M", 1024**2),
    ("K", 1024),
    ("B", 1),
    ("", 1),
)

_SIZE_FORMS = (
    "expected a non-negative number with an optional decimal fraction and an optional "
    "suffix B, K, M, G, T, P or E (upper case, powers of 1024), e.g. 2G, 512M or 1.5K"
)


def parse_size(text: str) -> int:
    """Bytes from a size such as ``2G`` or ``1.5K`` — systemd ``parse_size(t, 1024, …)``.

    Faithful to systemd, including its less obvious acceptances: leading whitespace and a
    ``+`` sign are fine, whitespace may separate number and suffix, and several
    components in strictly decreasing unit order are summed (``1G 512M``, ``1G2`` =
    1 GiB + 2 bytes).  Trailing whitespace, lower-case suffixes, negative numbers and
    values beyond 2^64-1 are refused.  The fraction is computed in IEEE double exactly
    like the C code (so ``0.1K`` is 102).

    Deliberate difference: C's strtoull() would silently wrap ``"\\v-1"`` (a minus sign
    after a vertical tab/form feed) to 2^64-1; we refuse every minus sign.
    """
    if not isinstance(text, str):
        raise TypeError("size must be a str")
    r = 0
    start_pos = 0
    p = 0
    n = len(text)
    while True:
        while p < n and text[p] in _WHITESPACE:
            p += 1
        rest = text[p:]
        parsed = _c_strtoul(rest, 10)
        if parsed is None:
            raise ValueError(f"Invalid size {text!r}: {_SIZE_FORMS}")
        # Any sign after optional isspace() — "-" means negative, refuse (see docstring).
        stripped = rest.lstrip(_C_ISSPACE)
        if stripped.startswith("-"):
            raise ValueError(f"Invalid size {text!r}: negative sizes are not allowed")
        value, end, overflowed = parsed
        if overflowed:
            raise ValueError(f"Invalid size {text!r}: too large, the maximum is 2^64-1 bytes")
        e = p + end
        frac = 0.0
        if e < n and text[e] == ".":
            e += 1
            if e < n and "0" <= text[e] <= "9":
                e2 = e
                while e2 < n and "0" <= text[e2] <= "9":
                    e2 += 1
                significant = text[e:e2].lstrip("0")
                if len(significant) > 20 or int(significant or "0") > _UINT64_MAX:
                    raise ValueError(f"Invalid size {text!r}: fraction has too many digits")
                l2 = int(significant or "0")
                frac = float(l2)
                for _ in range(e2 - e):
                    frac /= 10
                e = e2
        while e < n and text[e] in _WHITESPACE:
            e += 1
        for i in range(start_pos, len(_IEC_SUFFIXES)):
            suffix, factor = _IEC_SUFFIXES[i]
            if text.startswith(suffix, e):
                break
        else:
            raise ValueError(f"Invalid size {text!r}: {_SIZE_FORMS}; several parts must use decreasing units")
        # Mirror the C overflow checks bit for bit (including the unsigned wrap of l + 1).
        if ((value + (1 if frac > 0 else 0)) & _UINT64_MAX) > _UINT64_MAX // factor:
            raise ValueError(f"Invalid size {text!r}: too large, the maximum is 2^64-1 bytes")
        tmp = (value * factor + int(frac * float(factor))) & _UINT64_MAX
        if tmp > _UINT64_MAX - r:
            raise ValueError(f"Invalid size {text!r}: too large, the maximum is 2^64-1 bytes")
        r += tmp
        p = e + len(suffix)
        start_pos = i + 1
        if p >= n:
            return r


_TRUE_WORDS = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE_WORDS = frozenset({"0", "no", "n", "false", "f", "off"})
_BOOL_FORMS = "1, yes, y, true, t, on or 0, no, n, false, f, off (case-insensitive)"


def parse_boolean(text: str) -> bool:
    """systemd parse_boolean(): the usual yes/no words, ASCII case-insensitive."""
    if isinstance(text, str) and text.isascii():
        word = text.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise ValueError(f"Invalid boolean {text!r}: expected {_BOOL_FORMS}")


def parse_tristate(text: str) -> bool | None:
    """Boolean or "automatic" — systemd parse_tristate_full(v, "auto", …).

    Returns None for ``auto`` and, as in systemd, for the empty string (parse_tristate_full
    always maps the empty string to the third state).  ``auto`` is case-sensitive there.
    """
    if text == "" or text == "auto":
        return None
    try:
        return parse_boolean(text)
    except ValueError:
        raise ValueError(f"Invalid value {text!r}: expected auto or a boolean: {_BOOL_FORMS}") from None


# --------------------------------------------------------------------------------------
# C escapes and word extraction
# --------------------------------------------------------------------------------------

_SIMPLE_ESCAPES = {
    ord("a"): b"\a",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
    ord("\\"): b"\\",
    ord('"'): b'"',
    ord("'"): b"'",
    ord("s"): b" ",
}

_ESCAPE_FORMS = (
    "accepted escapes are \\a \\b \\f \\n \\r \\t \\v \\\\ \\\" \\' \\s, \\xNN, "
    "octal \\NNN (at most \\377), \\uXXXX and \\UXXXXXXXX"
)


def _unhex(data: bytes, pos: int) -> int:
    if pos < len(data):
        ch = chr(data[pos])
        if ch in _HEXDIGITS:
            return int(ch, 16)
    return -1


def _unichar_is_valid(c: int) -> bool:
    """systemd unichar_is_valid(): used for \\U escapes."""
    if c >= 0x110000:
        return False
    if c & 0xFFFFF800 == 0xD800:
        return False
    if 0xFDD0 <= c <= 0xFDEF:
        return False
    return c & 0xFFFE != 0xFFFE  # U+xxFFFE / U+xxFFFF noncharacters


def _utf8_encode_unichar(c: int) -> bytes:
    """systemd utf8_encode_unichar(); also encodes code points Python's codec refuses."""
    if c < 0x80:
        return bytes([c])
    if c < 0x800:
        return bytes([0xC0 | (c >> 6), 0x80 | (c & 0x3F)])
    if c < 0x10000:
        return bytes([0xE0 | (c >> 12), 0x80 | ((c >> 6) & 0x3F), 0x80 | (c & 0x3F)])
    return bytes([0xF0 | (c >> 18), 0x80 | ((c >> 12) & 0x3F), 0x80 | ((c >> 6) & 0x3F), 0x80 | (c & 0x3F)])


class _EscapeError(ValueError):
    pass


def _cunescape_one(data: bytes, pos: int, accept_nul: bool) -> tuple[bytes, int]:
    """systemd cunescape_one(): decode the escape whose letter is at ``data[pos]``.

    Returns the produced bytes and how many input bytes (after the backslash) were used.
    """
    if pos >= len(data):
        raise _EscapeError("trailing backslash")
    c = data[pos]
    simple = _SIMPLE_ESCAPES.get(c)
    if simple is not None:
        return simple, 1
    if c == ord("x"):
        a, b = _unhex(data, pos + 1), _unhex(data, pos + 2)
        if a < 0 or b < 0:
            raise _EscapeError("\\x needs exactly two hex digits")
        if a == 0 and b == 0 and not accept_nul:
            raise _EscapeError("NUL bytes are not allowed here")
        return bytes([(a << 4) | b]), 3
    if c in (ord("u"), ord("U")):
        ndig = 4 if c == ord("u") else 8
        digits = [_unhex(data, pos + 1 + k) for k in range(ndig)]
        if min(digits) < 0:
            raise _EscapeError(f"\\{chr(c)} needs exactly {ndig} hex digits")
        cp = 0
        for d in digits:
            cp = (cp << 4) | d
        if cp == 0 and not accept_nul:
            raise _EscapeError("NUL characters are not allowed here")
        if c == ord("u"):
            # Newer systemd refuses UTF-16 surrogates here (they are not valid UTF-8).
            if 0xD800 <= cp <= 0xDFFF:
                raise _EscapeError("\\u may not encode a UTF-16 surrogate")
        elif not _unichar_is_valid(cp):
            raise _EscapeError("\\U must encode a valid Unicode code point")
        return _utf8_encode_unichar(cp), ndig + 1
    if ord("0") <= c <= ord("7"):
        digits = [data[pos + k] - ord("0") if pos + k < len(data) else -1 for k in range(3)]
        if any(not 0 <= d <= 7 for d in digits):
            raise _EscapeError("octal escapes need exactly three octal digits")
        m = (digits[0] << 6) | (digits[1] << 3) | digits[2]
        if m == 0 and not accept_nul:
            raise _EscapeError("NUL bytes are not allowed here")
        if m > 255:
            raise _EscapeError("octal escapes may not exceed \\377")
        return bytes([m]), 3
    raise _EscapeError(f"unknown escape \\{_decode(bytes([c]))}")


def c_unescape(text: str) -> bytes:
    """systemd ``cunescape(text, UNESCAPE_ACCEPT_NUL)`` returning raw bytes.

    Used for ``--set-credential=`` data, which may be binary: ``\\x00`` and ``\\000``
    produce NUL bytes, ``\\xNN``/octal produce the literal byte, ``\\u``/``\\U`` produce
    UTF-8.  Unknown escapes and a trailing backslash are errors.  Unescaped characters
    are copied as their UTF-8 (surrogate-escape preserving) bytes.
    """
    data = _encode(text)
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c != 0x5C:
            out.append(c)
            i += 1
            continue
        try:
            decoded, used = _cunescape_one(data, i + 1, accept_nul=True)
        except _EscapeError as e:
            raise ValueError(f"Invalid escape in {text!r}: {e}; {_ESCAPE_FORMS}") from None
        out += decoded
        i += 1 + used
    return bytes(out)


# ExtractFlags subset we need.
_EXTRACT_CUNESCAPE = 1 << 1
_EXTRACT_UNQUOTE = 1 << 5
_EXTRACT_DONT_COALESCE_SEPARATORS = 1 << 6


def _extract_word(data: bytes, pos: int | None, separators: bytes, flags: int) -> tuple[bytes | None, int | None]:
    """systemd extract_first_word() on bytes, for the flag combinations vmspawn uses.

    Returns ``(word, next_pos)``; ``word`` is None when there are no more words, and
    ``next_pos`` is None when the input is exhausted (the C code's ``*p = NULL``).
    Raises ValueError for what the C code reports as -EINVAL.
    """
    if pos is None:
        return None, None
    n = len(data)
    word: bytearray | None = bytearray() if flags & _EXTRACT_DONT_COALESCE_SEPARATORS else None

    while True:  # skip leading separators
        if pos >= n:
            return (bytes(word) if word is not None else None), None
        c = data[pos]
        if c in separators:
            if flags & _EXTRACT_DONT_COALESCE_SEPARATORS:
                return bytes(word or b""), pos + 1
            pos += 1
            continue
        if word is None:
            word = bytearray()
        break

    quote = 0
    backslash = False
    while True:
        if backslash:
            if pos >= n:
                raise ValueError("trailing backslash")
            c = data[pos]
            if flags & _EXTRACT_CUNESCAPE:
                try:
                    decoded, used = _cunescape_one(data, pos, accept_nul=False)
                except _EscapeError as e:
                    raise ValueError(f"{e}; {_ESCAPE_FORMS}") from None
                pos += used - 1
                word += decoded
            else:
                word.append(c)
            backslash = False
            pos += 1
        elif quote:
            while True:
                if pos >= n:
                    raise ValueError("unbalanced quotes")
                c = data[pos]
                if c == quote:
                    quote = 0
                    break  # EXTRACT_UNQUOTE: drop the closing quote
                if c == 0x5C:
                    backslash = True
                    break
                word.append(c)
                pos += 1
            pos += 1
        else:
            while True:
                if pos >= n:
                    return bytes(word), None
                c = data[pos]
                if c in (0x22, 0x27) and flags & _EXTRACT_UNQUOTE:
                    quote = c
                    break
                if c == 0x5C:
                    backslash = True
                    break
                if c in separators:
                    if flags & _EXTRACT_DONT_COALESCE_SEPARATORS:
                        return bytes(word), pos + 1
                    while pos < n and data[pos] in separators:
                        pos += 1
                    return bytes(word), (pos if pos < n else None)
                word.append(c)
                pos += 1
            pos += 1


def extract_first_word(text: str, separators: str) -> tuple[str, str | None]:
    """systemd ``extract_first_word(&p, &w, separators, EXTRACT_DONT_COALESCE_SEPARATORS)``.

    Splits at the first *unescaped* separator: a backslash removes the special meaning of
    the next character and is dropped (``\\:`` → ``:``, ``\\\\`` → ``\\``, ``\\n`` → ``n``);
    no C-unescaping and no quote handling.  Returns ``(first_field, rest)`` where ``rest``
    is the verbatim remainder after the separator, or None when there was none.  A
    trailing lone backslash is an error.  This is the splitter of ``--bind=`` and the
    credential options.
    """
    seps = _encode(separators, "separators")
    data = _encode(text)
    try:
        word, nxt = _extract_word(data, 0, seps, _EXTRACT_DONT_COALESCE_SEPARATORS)
    except ValueError as e:
        raise ValueError(f"Invalid value {text!r}: {e} (use \\\\ for a literal backslash)") from None
    assert word is not None
    return _decode(word), (None if nxt is None else _decode(data[nxt:]))


def split_qemu_extra(text: str) -> list[str]:
    """Split ``$SYSTEMD_VMSPAWN_QEMU_EXTRA`` like vmspawn does.

    systemd ``strv_split_full(…, WHITESPACE, EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)``: words are
    separated by runs of space/tab/newline/CR; single or double quotes group (and are
    removed); C escapes are decoded both inside and outside quotes.  Note the systemd
    quirks this keeps: backslash-space is *not* an escape (use ``\\s`` or quotes), and
    escapes are processed inside single quotes too.  Unbalanced quotes and invalid
    escapes raise ValueError.  Raw bytes produced by ``\\xNN`` are returned as surrogate
    escapes so that ``os.fsencode()`` reproduces them in argv.
    """
    data = _encode(text, "$SYSTEMD_VMSPAWN_QEMU_EXTRA")
    words: list[str] = []
    pos: int | None = 0
    while True:
        try:
            word, pos = _extract_word(data, pos, _encode(_WHITESPACE), _EXTRACT_UNQUOTE | _EXTRACT_CUNESCAPE)
        except ValueError as e:
            raise ValueError(
                f"Invalid $SYSTEMD_VMSPAWN_QEMU_EXTRA {text!r}: {e}; words are separated by whitespace, "
                "quoted with '…' or \"…\", with C escapes"
            ) from None
        if word is None:
            return words
        words.append(_decode(word))


# --------------------------------------------------------------------------------------
# Paths, bind mounts
# --------------------------------------------------------------------------------------


def path_simplify(path: str) -> str:
    """systemd path_simplify(): drop ``.`` components, duplicate and trailing slashes.

    ``..`` is kept on purpose: resolving it lexically changes the meaning of the path when
    a component is a symlink, so systemd never does that.
    """
    if path == "":
        return ""
    absolute = path.startswith("/")
    parts = [c for c in path.split("/") if c not in ("", ".")]
    if absolute:
        return "/" + "/".join(parts)
    return "/".join(parts) if parts else "."


def _path_is_valid(path: str, accept_dot_dot: bool = True) -> bool:
    """systemd path_is_valid_full(): non-empty, components ≤ NAME_MAX, length < PATH_MAX."""
    if not path:
        return False
    raw = _encode(path)
    for comp in raw.split(b"/"):
        if len(comp) > _NAME_MAX:
            return False
        if comp == b".." and not accept_dot_dot:
            return False
    return len(raw.rstrip(b"/")) < _PATH_MAX


def parse_bind(text: str, cwd: str) -> tuple[str, str]:
    """``--bind=``/``--bind-ro=`` value ``SRC[:DST]`` → ``(absolute_source, target)`` (docs/reference/systemd-vmspawn.md §9.4).

    As vmspawn's runtime_mount_parse(): SRC is the first ``:``-field via
    :func:`extract_first_word` (so ``\\:`` embeds a colon in the source), made absolute
    against ``cwd``; DST is the remainder taken verbatim (escapes are *not* processed
    there); without DST the target is the literal source argument, so a relative source
    without an explicit target is refused by the "target must be absolute" check.

    Deliberate difference: the source is additionally passed through
    :func:`path_simplify` (vmspawn only joins it with the cwd); that is meaning-preserving
    (no ``..`` resolution) and gives stable paths for virtiofsd and the bind record.
    This does not look at the filesystem: the caller checks that the source is a directory.
    """
    if not cwd.startswith("/"):
        raise ValueError(f"working directory must be absolute, got {cwd!r}")
    forms = "expected SOURCE[:TARGET] with TARGET absolute (use \\: for a colon in SOURCE)"
    source_rel, rest = extract_first_word(text, ":")
    if not source_rel:
        raise ValueError(f"Invalid bind mount {text!r}: source path is empty; {forms}")
    source = source_rel if source_rel.startswith("/") else cwd.rstrip("/") + "/" + source_rel
    source = path_simplify(source)
    target = rest if rest is not None else source_rel
    if not target.startswith("/"):
        raise ValueError(f"Invalid bind mount {text!r}: target {target!r} is not an absolute path; {forms}")
    return source, target


# --------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------

_CRED_FORMS = "credential names must be 1-255 printable ASCII characters, without '/' or ':', and not '.' or '..'"


def credential_name_is_valid(name: str) -> bool:
    """systemd credential_name_valid(): a valid file name that is also a valid fd name.

    filename_is_valid(): non-empty, not ``.``/``..``, no ``/``, ≤ 255 bytes;
    fdname_is_valid(): only ASCII 0x20-0x7E and no ``:``.
    """
    if not isinstance(name, str) or not name or name in (".", ".."):
        return False
    if len(name) > _NAME_MAX:
        return False
    return all(" " <= ch <= "~" and ch not in "/:" for ch in name)


def parse_credential_id(text: str) -> str:
    """Validate a credential name (see :func:`credential_name_is_valid`) and return it."""
    if not credential_name_is_valid(text):
        raise ValueError(f"Credential name is not valid: {text!r}; {_CRED_FORMS}")
    return text


def parse_set_credential(text: str) -> tuple[str, bytes]:
    """``--set-credential=ID:VALUE`` → ``(id, data)`` (machine_credential_set()).

    ID is the first ``:``-field (``\\:`` and ``\\\\`` are unescaped there); VALUE is the
    rest, C-unescaped with NUL allowed, so binary data can be passed.  ``ID:`` gives an
    empty credential; a missing ``:`` is an error.  Duplicate detection is the caller's.
    """
    cred_id, rest = extract_first_word(text, ":")
    if rest is None:
        raise ValueError(f"Missing value for credential {text!r}: expected ID:VALUE")
    parse_credential_id(cred_id)
    return cred_id, c_unescape(rest)


def credential_source_kind(source: str) -> Literal["path", "credential"]:
    """How ``--load-credential=ID:SOURCE`` interprets SOURCE (machine_credential_load()).

    Anything containing a ``/`` that is a valid path is read as a file (or AF_UNIX socket);
    otherwise a valid credential name is looked up in ``$CREDENTIALS_DIRECTORY``.
    """
    if "/" in source and _path_is_valid(source):
        return "path"
    if credential_name_is_valid(source):
        return "credential"
    raise ValueError(
        f"Credential source appears to be neither a valid path nor a credential name: {source!r}; "
        "expected a path containing '/' or the name of one of our own credentials"
    )


def split_load_credential(text: str) -> tuple[str, str]:
    """``--load-credential=ID:SOURCE`` → ``(id, source)`` without reading anything.

    Validates the ID and that SOURCE is a path or a credential name
    (:func:`credential_source_kind`), so errors surface at parse time; reading is the
    caller's job.
    """
    cred_id, rest = extract_first_word(text, ":")
    if rest is None:
        raise ValueError(f"Missing value for credential {text!r}: expected ID:SOURCE")
    parse_credential_id(cred_id)
    credential_source_kind(rest)
    return cred_id, rest


# --------------------------------------------------------------------------------------
# vsock, user namespace
# --------------------------------------------------------------------------------------

_VMADDR_CID_SPECIAL = {"hypervisor": 0, "local": 1, "host": 2, "any": 0xFFFFFFFF}


def parse_vsock_cid(text: str) -> int | None:
    """``--vsock-cid=`` → CID, or None (empty string) for automatic assignment.

    Accepts what systemd vsock_parse_cid() accepts — a number in the syntax of safe_atou()
    (decimal, ``0x`` hex, ``0o``/leading-zero octal, ``0b`` binary) or the symbolic names
    ``hypervisor``/``local``/``host`` (0/1/2; newer systemd also ``any``) — and then, like
    vmspawn, refuses everything that is not a regular guest CID (3 … 0xFFFFFFFE).
    """
    if text == "":
        return None
    forms = "expected empty (automatic) or a number between 3 and 4294967294"
    if text in _VMADDR_CID_SPECIAL:
        cid = _VMADDR_CID_SPECIAL[text]
    else:
        try:
            cid = _safe_atou(text, 0, 32)
        except ValueError as e:
            raise ValueError(f"Invalid vsock CID {text!r}: {e}; {forms}") from None
    if not 2 < cid < _UINT32_MAX:
        raise ValueError(f"Specified CID is not regular, refusing: {cid}; {forms}")
    return cid


def _parse_uid(text: str) -> int:
    """systemd parse_uid(): strict decimal, no sign/leading zero/whitespace, valid uid."""
    uid = _safe_atou(
        text,
        10 | _SAFE_ATO_REFUSE_PLUS_MINUS | _SAFE_ATO_REFUSE_LEADING_ZERO | _SAFE_ATO_REFUSE_LEADING_WHITESPACE,
        32,
    )
    if uid in (0xFFFFFFFF, 0xFFFF):
        raise ValueError("65535 and 4294967295 are not valid UIDs")
    return uid


def parse_private_users(text: str) -> tuple[int, int]:
    """``--private-users=UIDBASE[:NUIDS]`` → ``(uid_shift, uid_range)``.

    systemd parse_userns_uid_range(): UIDBASE is a strict decimal UID (not 65535 or
    4294967295), NUIDS (default 65536) is parsed like safe_atou32(); the range must be
    non-empty and ``UIDBASE + NUIDS`` must not exceed 2^32-1.  vmspawn has none of
    nspawn's ``yes``/``pick``/``identity`` forms.
    """
    forms = "expected UIDBASE[:NUIDS], e.g. 100000 or 100000:65536"
    shift_text, sep, range_text = text.partition(":")
    uid_range = 65536
    if sep:
        try:
            uid_range = _safe_atou(range_text, 0, 32)
        except ValueError as e:
            raise ValueError(f"Failed to parse UID range {range_text!r}: {e}; {forms}") from None
    try:
        uid_shift = _parse_uid(shift_text)
    except ValueError as e:
        raise ValueError(f"Failed to parse UID {shift_text!r}: {e}; {forms}") from None
    if uid_range <= 0 or uid_shift > _UINT32_MAX - uid_range:
        raise ValueError(f"UID range cannot be empty or go beyond 4294967295: {text!r}; {forms}")
    return uid_shift, uid_range


# --------------------------------------------------------------------------------------
# Host/machine names
# --------------------------------------------------------------------------------------


def _valid_ldh_char(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9") or ch == "-"


def is_valid_hostname(name: str) -> bool:
    """systemd ``hostname_is_valid(name, 0)`` — also the rule for machine names.

    Dot-separated labels of ASCII letters, digits and ``-``; no empty labels, no label
    starting or ending with ``-``, no leading or trailing dot, at most 64 characters.
    """
    if not isinstance(name, str) or not name:
        return False
    dot = hyphen = True
    for ch in name:
        if ch == ".":
            if dot or hyphen:
                return False
            dot, hyphen = True, False
        elif ch == "-":
            if dot:
                return False
            dot, hyphen = False, True
        else:
            if not _valid_ldh_char(ch):
                return False
            dot = hyphen = False
    if dot or hyphen:
        return False
    return len(name) <= _HOST_NAME_MAX


def hostname_cleanup(name: str) -> str:
    """systemd hostname_cleanup(): drop what a hostname cannot contain.

    Invalid characters vanish; a ``.`` after ``.``/``-`` or at the start, and a ``-`` at a
    label start are dropped; the output is cut at 64 characters and *one* trailing ``-``
    or ``.`` removed — exactly once, as in systemd, so ``foo--`` becomes ``foo-`` (which
    then fails validation).
    """
    out: list[str] = []
    dot = hyphen = True
    for ch in name:
        if len(out) >= _HOST_NAME_MAX:
            break
        if ch == ".":
            if dot or hyphen:
                continue
            out.append(".")
            dot, hyphen = True, False
        elif ch == "-":
            if dot:
                continue
            out.append("-")
            dot, hyphen = False, True
        elif _valid_ldh_char(ch):
            out.append(ch)
            dot = hyphen = False
    if out and out[-1] in "-.":
        out.pop()
    return "".join(out)


def _path_extract_filename(path: str) -> str:
    """systemd path_extract_filename(): last component, ignoring ``.`` and extra slashes."""
    comps = [c for c in path.split("/") if c not in ("", ".")]
    if not comps:
        raise ValueError(f"cannot take a file name from {path!r}")
    last = comps[-1]
    if last == ".." or len(_encode(last)) > _NAME_MAX:
        raise ValueError(f"cannot take a file name from {path!r}")
    return last


def default_machine_name(image: str | None, directory: str | None, hostname: str) -> str:
    """The machine name vmspawn picks when ``-M`` is not given (docs/reference/systemd-vmspawn.md §1.1 step 4).

    The host name if the directory is ``/``; else the image file name with a trailing
    ``.raw`` removed; else the directory's last component.  The result goes through
    :func:`hostname_cleanup` and must then be a valid hostname.
    """
    please = "Failed to determine machine name automatically, please use -M."
    if directory is not None and path_simplify(directory) == "/":
        candidate = hostname
    elif image is not None:
        try:
            candidate = _path_extract_filename(image)
        except ValueError as e:
            raise ValueError(f"{e}. {please}") from None
        if candidate.endswith(".raw"):
            candidate = candidate[: -len(".raw")]
    elif directory is not None:
        try:
            candidate = _path_extract_filename(directory)
        except ValueError as e:
            raise ValueError(f"{e}. {please}") from None
    else:
        raise ValueError(f"Neither an image nor a directory is known. {please}")
    name = hostname_cleanup(candidate)
    if not is_valid_hostname(name):
        raise ValueError(please)
    return name


# --------------------------------------------------------------------------------------
# IDs, colours, MAC addresses
# --------------------------------------------------------------------------------------

_ID128_PLAIN = re.compile(r"[0-9a-fA-F]{32}")
_ID128_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(text: str) -> str:
    """``--uuid=`` → canonical lower-case RFC form (id128_from_string_nonzero()).

    sd_id128_from_string() accepts exactly 32 hex digits or the 8-4-4-4-12 form (either
    case); the all-zero ID is refused.
    """
    forms = "expected 32 hex digits or the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    if not (_ID128_PLAIN.fullmatch(text) or _ID128_UUID.fullmatch(text)):
        raise ValueError(f"Invalid UUID {text!r}: {forms}")
    h = text.replace("-", "").lower()
    if int(h, 16) == 0:
        raise ValueError("Machine UUID may not be all zeroes.")
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


_ANSI_COLOR_CODE = re.compile(r"[0-9]+(;[0-9]+)*")


def parse_background(text: str) -> str:
    """``--background=`` → the SGR parameter string, or ``""`` (disabled).

    systemd parse_background_argument(): empty, or looks_like_ansi_color_code(), i.e.
    ``^[0-9]+(;[0-9]+)*$`` — digits separated by single semicolons.  That is what makes it
    safe to splice into ``ESC [ … m``; the numbers themselves are not range-checked.
    """
    if text == "" or _ANSI_COLOR_CODE.fullmatch(text):
        return text
    raise ValueError(
        f"Invalid background color {text!r}: expected an ANSI SGR background color such as "
        "40 … 47, 48;2;R;G;B or 48;5;N (digits separated by ';'), or empty to disable"
    )


def parse_ether_addr(text: str) -> str:
    """systemd parse_ether_addr() → canonical ``xx:xx:xx:xx:xx:xx`` (lower case).

    Accepts ``xx:xx:xx:xx:xx:xx``, ``xx-xx-xx-xx-xx-xx`` (1-2 hex digits per byte) and
    ``xxxx.xxxx.xxxx`` (1-4 hex digits per 16-bit group); one separator kind throughout.
    """
    forms = "expected a MAC address like 12:34:56:78:9a:bc, 12-34-56-78-9a-bc or 1234.5678.9abc"
    k = 0
    while k < len(text) and text[k] in _HEXDIGITS:
        k += 1
    sep = text[k] if k < len(text) else ""
    if sep == ".":
        field_size = 2
    elif sep in (":", "-") and sep:
        field_size = 1
    else:
        raise ValueError(f"Invalid MAC address {text!r}: {forms}")
    out: list[int] = []
    p = 0
    n = len(text)
    for _ in range(6 // field_size):
        data = 0
        ndig = 0
        while ndig < field_size * 2 and p < n and text[p] != sep:
            if text[p] not in _HEXDIGITS:
                raise ValueError(f"Invalid MAC address {text!r}: {forms}")
            data = (data << 4) | int(text[p], 16)
            ndig += 1
            p += 1
        if ndig == 0 or (p < n and text[p] != sep):
            raise ValueError(f"Invalid MAC address {text!r}: {forms}")
        out.extend(data.to_bytes(field_size, "big"))
        if p >= n:
            break
        p += 1  # skip the separator
    else:
        # All fields consumed but the input continued (or ended in a separator).
        raise ValueError(f"Invalid MAC address {text!r}: {forms}")
    if len(out) != 6:
        raise ValueError(f"Invalid MAC address {text!r}: {forms}")
    return ":".join(f"{b:02x}" for b in out)


# --------------------------------------------------------------------------------------
# Unit names
# --------------------------------------------------------------------------------------

_UNIT_TYPES = frozenset(
    {"service", "mount", "swap", "socket", "target", "device", "automount", "timer", "path", "slice", "scope"}
)
_UNIT_NAME_MAX = 256
_VALID_CHARS = string.digits + string.ascii_letters + ":-_.\\"
_VALID_CHARS_WITH_AT = "@" + _VALID_CHARS


def _unit_name_is_valid(name: str) -> bool:
    """systemd ``unit_name_is_valid(n, UNIT_NAME_ANY)``."""
    if not name or len(_encode(name)) >= _UNIT_NAME_MAX:
        return False
    dot = name.rfind(".")
    if dot <= 0:
        return False
    if name[dot + 1 :] not in _UNIT_TYPES:
        return False
    prefix = name[:dot]
    if any(ch not in _VALID_CHARS_WITH_AT for ch in prefix):
        return False
    # Plain, instance (foo@bar.x) and template (foo@.x) are all "ANY"; only an empty
    # prefix before the '@' is invalid.
    return not prefix.startswith("@")


def _escape_byte(b: int) -> str:
    return f"\\x{b:02x}"


def _unit_name_escape(path: str) -> str:
    """systemd unit_name_escape(): ``/`` → ``-``, unsafe bytes → ``\\xNN``, leading ``.`` escaped."""
    out: list[str] = []
    data = _encode(path)
    for idx, b in enumerate(data):
        ch = chr(b)
        if idx == 0 and ch == ".":
            out.append(_escape_byte(b))
        elif ch == "/":
            out.append("-")
        elif ch in "-\\" or b >= 0x80 or ch not in _VALID_CHARS:
            out.append(_escape_byte(b))
        else:
            out.append(ch)
    return "".join(out)


def _path_components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def _is_device_path(path: str) -> bool:
    """systemd is_device_path(): below /dev/ or /sys/ *with* something after the prefix."""
    if not path.startswith("/"):
        return False
    comps = _path_components(path)
    return len(comps) > 1 and comps[0] in ("dev", "sys")


def _unit_name_from_path(path: str, suffix: str) -> str | None:
    """systemd unit_name_from_path(); None where systemd returns -EINVAL."""
    p = path_simplify(path)
    if p in ("", "/"):
        escaped = "-"
    else:
        if not _path_is_valid(p, accept_dot_dot=False):
            return None
        escaped = _unit_name_escape(p.strip("/"))
    name = escaped + suffix
    if len(_encode(name)) >= _UNIT_NAME_MAX:
        # systemd falls back to a hashed name here (unit_name_hash_long()); we do not
        # implement that hash, so refuse instead of producing a different name.
        raise ValueError(f"Unit name derived from path {path!r} is too long ({len(name)} ≥ 256 bytes); pass a shorter name")
    return name if _unit_name_is_valid(name) else None


def mangle_unit_name(name: str, suffix: str) -> str:
    """systemd ``unit_name_mangle_with_suffix(name, NULL, 0, suffix, …)``, e.g. for ``--slice=``.

    A name that is already a valid unit name of *any* type is kept as is (so
    ``foo.service`` stays ``foo.service`` even when ``.slice`` was asked for — the caller
    decides whether that is acceptable).  ``/dev/…`` and ``/sys/…`` paths become
    ``.device`` units (not ``/dev`` itself) and other absolute paths ``.mount`` units,
    as in systemd.  Anything else has ``/`` turned into ``-`` and characters invalid in
    unit names escaped as ``\\xNN`` (glob characters too — globbing is not enabled), then
    ``suffix`` appended if the result has no valid unit type suffix.  The result must be
    a valid unit name.
    """
    if not suffix.startswith(".") or suffix[1:] not in _UNIT_TYPES:
        raise ValueError(f"Invalid unit suffix {suffix!r}")
    forms = f"expected a unit name such as machine.slice or a name to which {suffix} is appended"
    if not name:
        raise ValueError(f"Invalid unit name {name!r}: empty; {forms}")
    _encode(name, "unit name")
    if _unit_name_is_valid(name):
        return name
    if _is_device_path(name):
        mangled = _unit_name_from_path(name, ".device")
        if mangled is not None:
            return mangled
    if name.startswith("/"):
        mangled = _unit_name_from_path(name, ".mount")
        if mangled is not None:
            return mangled
    out: list[str] = []
    for b in _encode(name):
        ch = chr(b)
        if ch == "/":
            out.append("-")
        elif b >= 0x80 or ch not in _VALID_CHARS_WITH_AT:
            out.append(_escape_byte(b))
        else:
            out.append(ch)
    mangled = "".join(out)
    if not _unit_name_is_valid(mangled):  # i.e. it has no valid unit type suffix yet
        mangled += suffix
    if not _unit_name_is_valid(mangled):
        raise ValueError(f"Failed to turn {name!r} into a unit name (got {mangled!r}); {forms}")
    return mangled


# --- signals --------------------------------------------------------------------------
# Linux's realtime signals have no names of their own: systemd (signal_to_string,
# signal_from_string) calls them SIGRTMIN+N and SIGRTMAX-N, and so does kill(1).
_SIGRTMIN = 34
_SIGRTMAX = 64
_STANDARD_SIGNALS = {
    1: "SIGHUP",
    2: "SIGINT",
    3: "SIGQUIT",
    4: "SIGILL",
    5: "SIGTRAP",
    6: "SIGABRT",
    7: "SIGBUS",
    8: "SIGFPE",
    9: "SIGKILL",
    10: "SIGUSR1",
    11: "SIGSEGV",
    12: "SIGUSR2",
    13: "SIGPIPE",
    14: "SIGALRM",
    15: "SIGTERM",
    16: "SIGSTKFLT",
    17: "SIGCHLD",
    18: "SIGCONT",
    19: "SIGSTOP",
    20: "SIGTSTP",
    21: "SIGTTIN",
    22: "SIGTTOU",
    23: "SIGURG",
    24: "SIGXCPU",
    25: "SIGXFSZ",
    26: "SIGVTALRM",
    27: "SIGPROF",
    28: "SIGWINCH",
    29: "SIGIO",
    30: "SIGPWR",
    31: "SIGSYS",
}
_SIGNAL_NUMBERS = {name: number for number, name in _STANDARD_SIGNALS.items()} | {"SIGIOT": 6, "SIGPOLL": 29}
_RT_SIGNAL = re.compile(r"SIGRT(MIN|MAX)(?:([+-])(\d{1,2}))?")


def signal_name(signo: int) -> str:
    """systemd's signal_to_string(): SIGTERM, SIGRTMIN+4, or "signal N" for anything else.

    Never raises: an exit status can carry any number, and naming it must not fail the
    cleanup that reports it."""
    if signo in _STANDARD_SIGNALS:
        return _STANDARD_SIGNALS[signo]
    if _SIGRTMIN <= signo <= _SIGRTMAX:
        return "SIGRTMIN" if signo == _SIGRTMIN else f"SIGRTMIN+{signo - _SIGRTMIN}"
    return f"signal {signo}"


def parse_signal(text: str | int) -> int:
    """systemd's signal_from_string(): a number 1…64, or a name with or without SIG
    (TERM, SIGTERM, RTMIN+4, SIGRTMAX-2), case-insensitively as kill(1) takes it."""
    accepted = "a number 1-64 or a name like SIGTERM, TERM or SIGRTMIN+4"
    if isinstance(text, int) and not isinstance(text, bool):
        if 1 <= text <= _SIGRTMAX:
            return text
        raise ValueError(f"{text} is not a signal ({accepted})")
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a signal ({accepted})")
    word = text.strip()
    if word.isdigit():
        return parse_signal(int(word))
    name = word.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name in _SIGNAL_NUMBERS:
        return _SIGNAL_NUMBERS[name]
    match = _RT_SIGNAL.fullmatch(name)
    if match:
        base = _SIGRTMIN if match[1] == "MIN" else _SIGRTMAX
        offset = int(match[3] or 0) * (1 if match[2] != "-" else -1)
        if match[2] is None or (match[1] == "MIN" and match[2] == "+") or (match[1] == "MAX" and match[2] == "-"):
            if _SIGRTMIN <= base + offset <= _SIGRTMAX:
                return base + offset
    raise ValueError(f"{text!r} is not a signal ({accepted})")


# --------------------------------------------------------------------------------------
# --cpus (QEMU's -smp)
# --------------------------------------------------------------------------------------

# The -smp properties QEMU knows; which of them a given machine type accepts is QEMU's to say
# (dies: 5.0, clusters: 7.0, books and drawers: 8.2, modules: 9.1).
SMP_KEYS = ("cpus", "maxcpus", "sockets", "dies", "clusters", "modules", "cores", "threads", "books", "drawers")
_SMP_NUMBER = re.compile(r"\+?(0[xX][0-9a-fA-F]+|[0-9]+)")


def parse_smp(text: str) -> str:
    """``--cpus=`` / ``--qemu-smp=``: a QEMU ``-smp`` value, returned verbatim.

    vmspawn 259 passes the string to ``-smp`` unchecked; QEMU then takes ``N`` (the CPU
    count) and ``KEY=N`` topology properties, comma-separated, and refuses zero ("CPU
    topology parameters must be greater than zero": a deprecation warning in QEMU 7.2, an
    error since 9.0), negative, non-integer and unknown keys. The same rules apply here, so
    ``--cpus=0`` is refused before a VM is created rather than booted with QEMU's guess.
    Numbers are decimal or ``0x`` hex, as QEMU's integer parser reads them.
    """
    forms = "expected a QEMU -smp value: a CPU count such as 4, optionally with topology such as 4,sockets=2"
    if not text:
        raise ValueError(f"empty CPU count; {forms}")
    parts = text.split(",")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()  # QEMU ignores one trailing comma
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if index:
                raise ValueError(f"{part!r} in {text!r} is not KEY=NUMBER; {forms}")
            key, value = "cpus", part
        if key not in SMP_KEYS:
            raise ValueError(f"unknown -smp property {key!r} in {text!r} (known: {', '.join(SMP_KEYS)}); {forms}")
        if not _SMP_NUMBER.fullmatch(value):
            raise ValueError(f"{key} must be a whole number, not {value!r}; {forms}")
        if int(value.lstrip("+"), 0 if value.lstrip("+")[:2].lower() == "0x" else 10) == 0:
            raise ValueError(f"{key} must be at least 1 (QEMU refuses 0); {forms}")
    return text
