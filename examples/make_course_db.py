"""Build a small SQLite course database to try `bulkmail --db` with (standard library only).

    python examples/make_course_db.py course.db [--force]

Tables: ``instructors(id, name, email)`` and ``courses(id, code, title, instructor_id,
starts_on)``, holding the same instructors as ``examples/instructors.csv``. Then, e.g.:

    bulkmail preview --db sqlite:///course.db --template reminder.txt --subject "Hi"

uses the default query ``SELECT name, email FROM instructors``, and a join gives every
course as a template variable:

    --query "SELECT i.name, i.email, c.code AS course, c.title, c.starts_on
             FROM instructors i JOIN courses c ON c.instructor_id = i.id"
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

SCHEMA = """
CREATE TABLE instructors (
    id    INTEGER PRIMARY KEY,
    name  TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE
);
CREATE TABLE courses (
    id            INTEGER PRIMARY KEY,
    code          TEXT NOT NULL UNIQUE,
    title         TEXT NOT NULL,
    instructor_id INTEGER NOT NULL REFERENCES instructors (id),
    starts_on     TEXT NOT NULL  -- ISO 8601 date
);
"""

INSTRUCTORS = [
    (1, "Ada Whitfield", "ada.whitfield@example.edu"),
    (2, "Benjamin Okafor", "b.okafor@example.edu"),
    (3, "Zoë Ångström", "zoe.angstrom@example.edu"),
    (4, "José Núñez", "jose.nunez@example.edu"),
    (5, "Priya Raman", "priya.raman@example.edu"),
    (6, "Marguerite Dubois", "m.dubois@example.org"),
    (7, "Liam O'Connor", "liam.oconnor@example.edu"),
    (8, "Chen Wei", "chen.wei@example.edu"),
    (9, "Fatima Al-Sayed", "fatima.alsayed@example.edu"),
    (10, "Søren Kierkegaard-Hansen", "soren.hansen@example.org"),
    (11, "Grace Nakamura", "grace.nakamura@example.edu"),
    (12, "Tomasz Wiśniewski", "t.wisniewski@example.edu"),
]

COURSES = [
    (1, "CS101", "Introduction to Programming", 1, "2025-09-05"),
    (2, "CS220", "Data Structures", 2, "2025-09-05"),
    (3, "PHYS210", "Classical Mechanics", 3, "2025-09-08"),
    (4, "MATH150", "Calculus I, Section B", 4, "2025-09-08"),
    (5, "STAT200", "Applied Statistics", 5, "2025-09-10"),
    (6, "FREN101", "Elementary French", 6, "2025-09-10"),
    (7, "HIST130", "Modern European History", 7, "2025-09-12"),
    (8, "CHEM110", "General Chemistry", 8, "2025-09-12"),
    (9, "BIO120", "Cell Biology", 9, "2025-09-15"),
    (10, "PHIL101", "Introduction to Philosophy", 10, "2025-09-15"),
    (11, "ECON101", "Principles of Economics", 11, "2025-09-19"),
    (12, "ENG205", "Technical Writing", 12, "2025-09-19"),
]


def build(path: Path) -> None:
    """Write the database to ``path`` (which must not exist yet)."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executescript(SCHEMA)
            conn.executemany("INSERT INTO instructors VALUES (?, ?, ?)", INSTRUCTORS)
            conn.executemany("INSERT INTO courses VALUES (?, ?, ?, ?, ?)", COURSES)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a small SQLite course database.")
    parser.add_argument("path", type=Path, help="the database file to create, e.g. course.db")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")
    args = parser.parse_args(argv)
    target: Path = args.path
    if target.exists() and not args.force:
        print(f"{target}: already exists (use --force to replace it)", file=sys.stderr)
        return 2
    if target.is_dir():
        print(f"{target}: is a directory", file=sys.stderr)
        return 2
    # Build beside the target, then move it into place: never a half-written database.
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        build(partial)
        os.replace(partial, target)
    except (OSError, sqlite3.Error) as exc:
        partial.unlink(missing_ok=True)
        print(f"{target}: cannot create ({exc})", file=sys.stderr)
        return 1
    print(f"{target}: {len(INSTRUCTORS)} instructors, {len(COURSES)} courses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
