"""The web page: static HTML, CSS and JavaScript that call the JSON API with the user's key. The page
itself holds no data, so it is served without authentication; every API call it makes is
authenticated like any other client's."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, redirect, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"
PAGES = ("index.html", "app.js", "style.css")

web = Blueprint("web", __name__)


@web.get("/")
def root():
    return redirect("/ui/")


@web.get("/ui/")
def index():
    return send_from_directory(STATIC, "index.html", max_age=0)


@web.get("/ui/<name>")
def asset(name: str):
    if name not in PAGES:
        from .problems import Problem

        raise Problem(404, "Not Found", f"no page asset {name!r}")
    return send_from_directory(STATIC, name, max_age=0)
