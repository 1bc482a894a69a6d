"""The corpus' sources: Debian packages of openly licensed English documentation, one entry each.

Every entry of :data:`SOURCES` names
  packages     the Debian binary packages fetched (``apt-get download``) and unpacked for it;
  kind         how documents are found and cleaned (train.corpus.iter_documents):
               "sphinx" (``_sources/*.rst.txt`` of a Sphinx build), "rst" (a reStructuredText
               tree), "html" (HTML pages), "man" (roff manual pages, gzipped or not);
  include      glob patterns, relative to the unpacked package, of the files to read (not sphinx);
  exclude      a regex; files whose path (relative to the pattern's directory) matches are skipped
               (indexes, search pages, highlighted source code, translations, ...);
  tarball      (optional) a tarball inside the package whose members are the tree (linux-source);
  licence      an SPDX expression for the text, from the package's Debian copyright file
               (copied next to the corpus as licences/{source}.copyright);
  description  one line.
"""
from __future__ import annotations

_HTML_NOISE = r"(^|/)(_modules|_static|_images|_downloads|_sources|genindex|search|py-modindex|objects)(/|\.|$)"


def _doc(pkg: str) -> str:
    return f"usr/share/doc/{pkg}/copyright"


def _sphinx(pkg: str, licence: str, description: str, licence_file: str | None = None) -> dict:
    return {"package": pkg, "packages": [pkg], "kind": "sphinx", "licence": licence,
            "licence_file": licence_file or _doc(pkg), "description": description}


def _html(pkg: str, include: list[str], licence: str, description: str, exclude: str = _HTML_NOISE,
          licence_file: str | None = None) -> dict:
    return {"package": pkg, "packages": [pkg], "kind": "html", "include": include, "exclude": exclude,
            "licence": licence, "licence_file": licence_file or _doc(pkg), "description": description}


def _man(packages: list[str], licence: str, description: str, include: list[str] | None = None) -> dict:
    return {"package": packages[0], "packages": packages, "kind": "man",
            "include": include or ["usr/share/man/man[1-8]/*"], "exclude": r"\.(de|fr|ja|ko|zh)\b",
            "licence": licence, "licence_file": _doc(packages[0]), "description": description}


# Command-line tools whose manual pages are the source of "What does `ls -a` do?" questions.
TOOL_PACKAGES = ["coreutils", "findutils", "grep", "sed", "tar", "gzip", "bzip2", "xz-utils", "diffutils",
                 "util-linux", "procps", "openssh-client", "git-man", "rsync", "curl", "wget", "make", "less",
                 "bash", "man-db", "iproute2", "apt", "dpkg", "file"]

SOURCES: dict[str, dict] = {
    # --- Sphinx builds (reStructuredText sources)
    "python3.11-doc": _sphinx("python3.11-doc", "PSF-2.0",  # code examples are additionally 0BSD
                              "The Python 3.11 documentation (tutorial, library and language reference, HOWTOs)."),
    "sphinx-doc": _sphinx("sphinx-doc", "BSD-2-Clause", "The Sphinx documentation generator's manual."),
    "python-flask-doc": _sphinx("python-flask-doc", "BSD-3-Clause", "The Flask web framework's documentation."),
    "python-click-doc": _sphinx("python-click-doc", "BSD-3-Clause", "The Click command-line library's documentation."),
    "python-pandas-doc": _sphinx("python-pandas-doc", "BSD-3-Clause", "The pandas data analysis library's documentation."),
    "python-astropy-doc": _sphinx("python-astropy-doc", "BSD-3-Clause", "The Astropy astronomy library's documentation."),
    "python-sklearn-doc": _sphinx("python-sklearn-doc", "BSD-3-Clause", "The scikit-learn machine learning library's documentation."),
    "python-statsmodels-doc": _sphinx("python-statsmodels-doc", "BSD-3-Clause", "The statsmodels statistics library's documentation."),
    "python-sympy-doc": _sphinx("python-sympy-doc", "BSD-3-Clause", "The SymPy computer algebra library's documentation."),
    "python-dask-doc": _sphinx("python-dask-doc", "BSD-3-Clause", "The Dask parallel computing library's documentation."),
    "python-xarray-doc": _sphinx("python-xarray-doc", "Apache-2.0", "The xarray labelled-arrays library's documentation."),
    "python-pytest-doc": _sphinx("python-pytest-doc", "MIT", "The pytest testing framework's documentation."),
    "python-setuptools-doc": _sphinx("python-setuptools-doc", "MIT", "The setuptools packaging library's documentation."),
    "python-werkzeug-doc": _sphinx("python-werkzeug-doc", "BSD-3-Clause", "The Werkzeug WSGI library's documentation."),
    "python-mpmath-doc": _sphinx("python-mpmath-doc", "BSD-3-Clause", "The mpmath arbitrary-precision library's documentation."),
    # --- API reference pages that Sphinx generated (autodoc/autosummary: text only in the HTML)
    "python-pandas-api": _html("python-pandas-doc", ["usr/share/doc/python-pandas-doc/html/reference/api/*.html",
                                                     "usr/share/doc/python-pandas-doc/html/generated/*.html"],
                               "BSD-3-Clause", "pandas' API reference (generated HTML pages)."),
    "python-sklearn-api": _html("python-sklearn-doc", ["usr/share/doc/python-sklearn-doc/html/modules/generated/*.html",
                                                       "usr/share/doc/python-sklearn-doc/html/auto_examples/**/*.html"],
                                "BSD-3-Clause", "scikit-learn's API reference and examples (generated HTML pages)."),
    "python-astropy-api": _html("python-astropy-doc", ["usr/share/doc/python-astropy-doc/html/api/*.html"],
                                "BSD-3-Clause", "Astropy's API reference (generated HTML pages)."),
    "python-statsmodels-api": _html("python-statsmodels-doc",
                                    ["usr/share/doc/python-statsmodels-doc/html/generated/*.html",
                                     "usr/share/doc/python-statsmodels-doc/html/examples/notebooks/generated/*.html"],
                                    "BSD-3-Clause", "statsmodels' API reference and example notebooks (HTML)."),
    "python-dask-api": _html("python-dask-doc", ["usr/share/doc/python-dask-doc/html/generated/*.html"],
                             "BSD-3-Clause", "Dask's API reference (generated HTML pages)."),
    "python-sympy-api": _html("python-sympy-doc", ["usr/share/doc/python-sympy-doc/html/modules/**/*.html"],
                              "BSD-3-Clause", "SymPy's module reference (HTML, with the docstrings)."),
    "cmake-doc": _sphinx("cmake-doc", "BSD-3-Clause", "The CMake build system's documentation.",
                         licence_file="usr/share/doc/cmake-data/copyright"),
    # --- reStructuredText tree
    "linux-doc": {
        "package": "linux-source-6.1", "packages": ["linux-source-6.1"], "kind": "rst",
        "tarball": "usr/src/linux-source-6.1.tar.xz", "tar_member": "linux-source-6.1/Documentation",
        "include": ["linux-source-6.1/Documentation/**/*.rst"],
        "exclude": r"(^|/)(translations|output)/",
        "licence": "GPL-2.0-only",  # a few files are dual-licensed GPL-2.0 OR CC-BY-4.0 / GFDL-1.1+
        "licence_file": _doc("linux-source-6.1"),
        "description": "The Linux kernel's Documentation/ tree (admin guide, driver, core and process docs).",
    },
    # --- HTML
    "python-django-doc": _html("python-django-doc", ["usr/share/doc/python-django-doc/html/**/*.html"],
                               "BSD-3-Clause", "The Django web framework's documentation."),
    "python-scipy-doc": _html("python-scipy-doc", ["usr/share/doc/python-scipy-doc/html/**/*.html"],
                              "BSD-3-Clause", "The SciPy library's documentation (tutorial and API reference)."),
    "python-sqlalchemy-doc": _html("python-sqlalchemy-doc", ["usr/share/doc/python-sqlalchemy-doc/html/**/*.html"],
                                   "MIT", "The SQLAlchemy database toolkit's documentation."),
    "postgresql-doc-15": _html("postgresql-doc-15", ["usr/share/doc/postgresql-doc-15/html/*.html"], "PostgreSQL",
                               "The PostgreSQL 15 manual.", exclude=r"^(bookindex|release-|index\.html)"),
    "debian-reference-en": _html("debian-reference-en", ["usr/share/debian-reference/*.en.html"], "GPL-2.0-or-later",
                                 "The Debian Reference (English)."),
    "debian-handbook": _html("debian-handbook", ["usr/share/doc/debian-handbook/html/en-US/*.html"],
                             "GPL-2.0-or-later OR CC-BY-SA-3.0", "The Debian Administrator's Handbook (English).",
                             exclude=r"^(index|ix01)\.html$"),
    "nodejs-doc": _html("nodejs-doc", ["usr/share/doc/nodejs/api/*.html"], "MIT",
                        "The Node.js API documentation.", exclude=r"^(all|index)\.html$"),
    "git-doc": _html("git-doc", ["usr/share/doc/git-doc/**/*.html"], "GPL-2.0-only",
                     "Git's manual pages, user manual and technical documentation (HTML)."),
    "octave-doc": _html("octave-doc", ["usr/share/doc/octave/octave.html/*.html", "usr/share/doc/octave/liboctave.html/*.html"],
                        "GPL-3.0-or-later", "The GNU Octave manual.", exclude=r"^index\.html$"),
    "bash-doc": _html("bash-doc", ["usr/share/doc/bash-doc/bashref.html"], "GPL-3.0-or-later",
                      "The GNU Bash reference manual."),
    "openjdk-17-doc": _html("openjdk-17-doc", ["usr/share/doc/openjdk-17-doc/api/**/*.html"],
                            "GPL-2.0-only WITH Classpath-exception-2.0", "The Java 17 API documentation (javadoc).",
                            exclude=r"(^|/)(class-use|legal|index-files|resources)/|(package-tree|package-use|"
                                    r"overview-tree|allclasses-index|allpackages-index|deprecated-list|"
                                    r"serialized-form|help-doc|constant-values|search|index|new-list|"
                                    r"system-properties|external-specs)\.html$",
                            licence_file=_doc("openjdk-17-jre-headless")),
    "sqlite3-doc": _html("sqlite3-doc", ["usr/share/doc/sqlite3/**/*.html"], "blessing",  # public domain
                         "The SQLite documentation (SQL dialect, C interface, release notes).",
                         exclude=r"(^|/)(sitemap|keyword_index|toc)\.html$"),
    "erlang-doc": _html("erlang-doc", ["usr/share/doc/erlang-doc/**/*.html"], "Apache-2.0",
                        "The Erlang/OTP documentation (reference manual, libraries).",
                        exclude=r"(^|/)(java|js|index|search|release_notes)(/|\.html$)"),
    "apache2-doc": _html("apache2-doc", ["usr/share/doc/apache2-doc/manual/en/**/*.html"], "Apache-2.0",
                         "The Apache HTTP Server manual (English).", exclude=r"(^|/)(index|sitemap|quickreference)\.html$"),
    # --- manual pages
    "perl-doc": _man(["perl-doc"], "GPL-1.0-or-later OR Artistic-1.0-Perl",
                     "Perl's documentation (perlfunc, perlop, FAQs, core modules) as manual pages."),
    "manpages": _man(["manpages", "manpages-dev"], "Linux-man-pages-copyleft AND GPL-2.0-or-later",
                     "The Linux man-pages project: system calls, library functions, files, conventions."),
    "tool-manpages": _man(TOOL_PACKAGES, "GPL-3.0-or-later AND GPL-2.0-or-later AND others (see licences/)",
                          "Manual pages of common command-line tools (coreutils, grep, tar, git, ssh, ...)."),
    "libssl-doc": _man(["libssl-doc"], "Apache-2.0", "OpenSSL's API manual pages (libssl, libcrypto)."),
    "systemd-man": _man(["systemd"], "LGPL-2.1-or-later", "systemd's manual pages (units, services, tools)."),
    "tcl8.6-doc": _man(["tcl8.6-doc"], "TCL", "The Tcl 8.6 manual pages (commands and C API).",
                       include=["usr/share/man/man3/*", "usr/share/man/mann/*"]),
}
