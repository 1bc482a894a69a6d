"""HTML documentation page -> Markdown-ish text (standard library only).

Works for the generators Debian's doc packages use (Sphinx, DocBook/PostgreSQL, Publican,
asciidoc, texinfo, javadoc, Node's doc tool):

* only the page's main content is kept when it marks one (``<main>``, ``role="main"``,
  ``class="body"``, ``id="content"`` ...); navigation, headers, footers, sidebars, scripts,
  styles, "¶" header links and "[source]" links are dropped everywhere;
* ``<h1>``..``<h6>`` become ``#``..``######`` headings, ``<pre>`` fenced code (verbatim);
* definition lists (``<dt>``/``<dd>``: Sphinx API entries, option lists) become the term alone
  on a line (an API signature in backticks, as train.rst_clean writes it) followed by the
  description indented by four spaces, which is what train.qa_pairs reads;
* ``<li>`` becomes "- item", inline ``<code>``/``<tt>`` become `code`; entities are decoded.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

SKIP_TAGS = {"script", "style", "nav", "header", "footer", "head", "noscript", "svg", "button",
             "form", "select", "template", "iframe"}
SKIP_CLASS = re.compile(r"(^|[\s_-])(sphinxsidebar|sidebar|related|footer|header|navheader|navfooter|"
                        r"navigation|breadcrumbs?|headerlink|viewcode-link|toc|toctree-wrapper|search|"
                        r"menu|docnav|skip-nav|top-nav|bottom-nav|sub-nav|flex-box|legal|copyright|"
                        r"rst-footer-buttons|prev-next|clearer|topbar|nav)($|[\s_-])", re.I)
MAIN_MARKERS = (("main", None, None), (None, "role", "main"), ("div", "class", "body"),
                ("div", "id", "content"), ("div", "id", "apicontent"), ("div", "class", "document"))
VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "area", "base", "col", "source", "track"}
BLOCK = {"p", "div", "section", "article", "table", "tr", "ul", "ol", "dl", "blockquote", "figure",
         "caption", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre", "br", "hr"}
INLINE_CODE = {"code", "tt", "kbd", "samp"}


def _matches(tag: str, attrs: dict, marker) -> bool:
    mtag, key, value = marker
    if mtag and tag != mtag:
        return False
    if key is None:
        return True
    return value in (attrs.get(key) or "").split()


class _Converter(HTMLParser):
    def __init__(self, main_marker):
        super().__init__(convert_charrefs=True)
        self.main_marker = main_marker
        self.in_main = 0 if main_marker else 1  # > 0: inside the main content
        self.main_tag = ""
        self.skip: list[list] = []  # [tag, nesting] of skipped elements we are inside
        self.lines: list[str] = []
        self.cur = ""
        self.pre = 0
        self.code = 0
        self.dd = 0
        self.dt = False
        self.list_depth = 0

    # ----- output helpers
    def _indent(self) -> str:
        return "    " * self.dd

    def flush(self, blank: bool = False) -> None:
        text = re.sub(r"[ \t]+", " ", self.cur).strip()
        if text:
            if self.dt:
                text = "`" + text.strip("`").replace("`", "") + "`"
            self.lines.append(self._indent() + text)
        self.cur = ""
        if blank and self.lines and self.lines[-1] != "":
            self.lines.append("")

    def handle_starttag(self, tag, attrs_list):
        attrs = {k: (v or "") for k, v in attrs_list}
        if self.skip:
            if tag == self.skip[-1][0] and tag not in VOID:
                self.skip[-1][1] += 1
            return
        if not self.in_main:
            if _matches(tag, attrs, self.main_marker):
                self.in_main, self.main_tag = 1, tag
            return
        if tag == self.main_tag and tag not in VOID:
            self.in_main += 1
        if tag in SKIP_TAGS or SKIP_CLASS.search(attrs.get("class", "")) or SKIP_CLASS.search(attrs.get("id", "")) \
                or SKIP_CLASS.search(attrs.get("role", "")):
            if tag not in VOID:
                self.skip.append([tag, 1])
            return
        if tag in BLOCK:
            self.flush(blank=tag in ("p", "pre", "dl", "ul", "ol", "table", "blockquote") or tag[0] == "h")
        if tag == "pre":
            self.lines.append(self._indent() + "```")
            self.pre += 1
        elif tag in INLINE_CODE and not self.pre and not self.dt:
            self.cur += "`"
            self.code += 1
        elif tag[0] == "h" and tag[1:].isdigit():
            self.cur = "#" * int(tag[1]) + " "
        elif tag == "li":
            self.cur = "  " * max(self.list_depth - 1, 0) + "- "
        elif tag in ("ul", "ol"):
            self.list_depth += 1
        elif tag == "dt":
            self.dt = True
        elif tag == "dd":
            self.dd += 1

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] -= 1
                if self.skip[-1][1] == 0:
                    self.skip.pop()
            return
        if not self.in_main:
            return
        if tag == self.main_tag:
            self.in_main -= 1
            if not self.in_main:
                self.flush()
                return
        if tag == "pre" and self.pre:
            self.pre -= 1
            code = self.cur.strip("\n")
            self.cur = ""
            self.lines.extend(self._indent() + ln.rstrip() for ln in code.split("\n"))
            self.lines.extend([self._indent() + "```", ""])
            return
        if tag in INLINE_CODE and self.code and not self.pre and not self.dt:
            self.code -= 1
            self.cur = self.cur.rstrip() + "`"
            return
        if tag in BLOCK:
            self.flush(blank=tag not in ("li", "dt", "tr", "br", "div"))
        if tag == "dt":
            self.dt = False
        elif tag == "dd" and self.dd:
            self.dd -= 1
        elif tag in ("ul", "ol") and self.list_depth:
            self.list_depth -= 1

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and not self.skip and self.in_main:
            self.flush()

    def handle_data(self, data):
        if self.skip or not self.in_main:
            return
        if self.pre:
            self.cur += data
        else:
            self.cur += data.replace("\n", " ").replace("\u00b6", "")


def _main_marker(html: str):
    """(marker, offset of its tag) for the first marker of MAIN_MARKERS that the page holds, else (None, 0)."""
    for tag, key, value in MAIN_MARKERS:
        if key is None:
            m = re.search(rf"<{tag}[\s>]", html)
        else:
            m = re.search(rf"<{tag or '[a-z]+'}\b[^>]*\b{key}=\"([^\"]*\s)?{value}[\s\"]", html)  # a whole class/id
        if m:
            return (tag, key, value), m.start()
    return None, 0


def clean_html(html: str) -> str:
    """Text of one HTML page (see the module docstring); ends in a newline, or "" when empty."""
    marker, start = _main_marker(html)
    conv = _Converter(marker)
    try:
        conv.feed(html[start:])  # nothing before the main content's tag is kept: skip parsing it
        conv.close()
    except (AssertionError, ValueError):  # a broken page: keep what was converted so far
        pass
    conv.flush()
    lines = [ln for ln in conv.lines if ln.strip() != "-"]  # empty list items (link-only menus)
    text = "\n".join(re.sub(r"^(#+ .*?)\s*#$", r"\1", ln) for ln in lines)  # "Title#" anchors
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n" if text else ""


def html_title(html: str) -> str:
    m = re.search(r"<title>(.*?)</title>", html, re.S | re.I)
    return re.sub(r"\s+", " ", m.group(1)).strip() if m else ""
