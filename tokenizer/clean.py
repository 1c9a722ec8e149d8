"""`do_clean_text`: URL, e-mail, phone number, date and price spans become tags; box-drawing runs become one tag.

The spans are exactly those transformers' regexes replace (same patterns, same order, leftmost matches), but
found in linear time. Three of those regexes are quadratic when run as-is: on a long run of characters they
retry from every position inside the run and rescan it to the end (20,000 digits take transformers about 25 s
in the price regex). The fixes below rely on where a leftmost match can start, argued next to each one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_URL = re.compile(r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)")
_TEL = re.compile(r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}")
_ERA_DATE = re.compile(
    r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月(0?[1-9]|[12][0-9]|3[01])日"
    r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*"
)

# E-mail: `LOCAL*@DOMAIN...`. From any start inside a run of LOCAL characters, LOCAL* runs to the end of that
# run, and only an '@' right there can follow, so every start in one run succeeds or fails together; the
# leftmost match therefore starts where a run starts, or at the search position itself.
_EMAIL_BODY = r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*"
_EMAIL = re.compile(_EMAIL_BODY)
_EMAIL_AT_RUN_START = re.compile(r"(?<![A-Za-z0-9\._+])" + _EMAIL_BODY)

# Date: `(YEAR/)* MONTH/ ...` with YEAR/ a 5-character unit `[12]ddd[/-年]`. If a match starts right after such a
# unit, starting 5 characters earlier matches too (one more unit). So the leftmost match has no unit just before
# it, unless that unit reaches back before the search position: those first 5 positions are tried one by one.
_DATE_BODY = (
    r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*"
    r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*"
)
_DATE = re.compile(_DATE_BODY)
_DATE_AFTER_NO_YEAR = re.compile(r"(?<![12]\d{3}[/\-年])" + _DATE_BODY)
_YEAR_UNIT = 5

# Price, transformers' pattern:
#   (?:\d,\d{3}|[\d億])*+ (?:\d,\d{3}|[\d万])*+ (?:\d,\d{3}|[\d千])*+ CURRENCY+ (?:\(税込\)|\(税抜\)|\+tax)*
# The three possessive loops (the "amount") are deterministic, and each CURRENCY alternative begins with 千, 万,
# 円, ドル or ユーロ. A match's amount covers only characters of AMOUNT_CHARS, and its currency must begin at the
# first character after that run (円/ドル/ユーロ) or at a 万 ending it. So matches belong to runs of amount
# characters followed by 円, ドル or ユーロ; within such a run the loops' end positions are computed once for all
# starts (right to left), and the first start whose amount ends where CURRENCY+ matches is the leftmost match.
_AMOUNT_CHARS = r"[\d,億万千]"
_PRICED_RUN = re.compile(rf"(?<!{_AMOUNT_CHARS}){_AMOUNT_CHARS}*(?=円|ドル|ユーロ)")
_CURRENCY_AND_TAX = re.compile(
    r"(?:千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+(?:\(税込\)|\(税抜\)|\+tax)*"
)
_LOOP_MARKS = ("億", "万", "千")  # the non-digit character each amount loop accepts

_BOX_CHARS = (
    "─━│┃┄┅┆┇┈┉┊┋┌┍┎┏┐┑┒┓└┕┖┗┘┙┚┛├┝┞┟┠┡┢┣┤┥┦┧┨┩┪┫┬┭┮┯┰┱┲┳┴┵┶┷┸┹┺┻┼┽┾┿╀╁╂╃╄╅╆╇╈╉╊╋╌╍╎╏═║╒╓╔╕╖╗╘╙╚╛╜╝╞╟╠╡╢╣╤"
    "╥╦╧╨╩╪╫╬╭╮╯╰╱╲╳╴╵╶╷╸╹╺╻╼╽╾╿▀▁▂▃▄▅▆▇█▉▊▋▌▍▎▏▐░▒▓▔▕▖▗▘▙▚▛▜▝▞▟"
)
_BOX_TO_TAG = str.maketrans(dict.fromkeys(_BOX_CHARS, "<BLOCK>"))
_BLOCK_RUN = re.compile("(?:<BLOCK>){2,}")  # "<BLOCK>" cannot overlap itself, so a run collapses to one tag

Span = tuple[int, int]


def clean_text(text: str) -> str:
    text = _URL.sub("<URL>", text)
    text = _replace(text, _find_email, "<EMAIL>")
    text = _TEL.sub("<TEL>", text)
    text = _replace(text, _find_date, "<DATE>")
    text = _ERA_DATE.sub("<DATE>", text)
    text = _replace(text, _find_price, "<PRICE>")
    text = text.translate(_BOX_TO_TAG)
    return _BLOCK_RUN.sub("<BLOCK>", text)


def _replace(text: str, find: Callable[[str, int], Span | None], tag: str) -> str:
    """re.sub with a custom leftmost-match finder (none of the patterns can match the empty string)."""
    pieces, start = [], 0
    while (span := find(text, start)) is not None:
        pieces += (text[start:span[0]], tag)
        start = span[1]
    pieces.append(text[start:])
    return "".join(pieces)


def _find_email(text: str, start: int) -> Span | None:
    match = _EMAIL.match(text, start) or _EMAIL_AT_RUN_START.search(text, start)
    return match.span() if match else None


def _find_date(text: str, start: int) -> Span | None:
    for pos in range(start, min(start + _YEAR_UNIT, len(text))):
        if text[pos] in "0123456789" and (match := _DATE.match(text, pos)):  # a date starts with an ASCII digit
            return match.span()
    match = _DATE_AFTER_NO_YEAR.search(text, start + _YEAR_UNIT)
    return match.span() if match else None


def _find_price(text: str, start: int) -> Span | None:
    run = _PRICED_RUN.search(text, start)
    if run is None:
        return None
    run_start, run_end = run.span()
    amount_ends = _amount_ends(text, run_start, run_end)
    for pos in range(run_start, run_end):
        if currency := _CURRENCY_AND_TAX.match(text, amount_ends[pos - run_start]):
            return pos, currency.end()
    # Starting at the currency itself (empty amount) always matches: the run is followed by 円, ドル or ユーロ.
    return run_end, _CURRENCY_AND_TAX.match(text, run_end).end()


def _amount_ends(text: str, run_start: int, run_end: int) -> list[int]:
    """[pos - run_start] -> where the three possessive amount loops stop when started at pos (run_start..run_end)."""
    size = run_end - run_start + 1
    # ends[k][i]: stop position when loop k is about to run at run_start + i; past the last loop it is the position.
    ends = [[0] * size for _ in _LOOP_MARKS]
    for i in range(size - 1, -1, -1):
        pos = run_start + i
        ch = text[pos] if pos < run_end else ""
        grouped = (pos + 5 <= run_end and ch.isdecimal() and text[pos + 1] == ","
                   and text[pos + 2:pos + 5].isdecimal())  # `\d,\d{3}` is tried before the single character
        for k in (2, 1, 0):
            if grouped:
                ends[k][i] = ends[k][i + 5]
            elif ch and (ch.isdecimal() or ch == _LOOP_MARKS[k]):
                ends[k][i] = ends[k][i + 1]
            else:
                ends[k][i] = ends[k + 1][i] if k < 2 else pos
    return ends[0]
