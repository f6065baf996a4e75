"""Reports: self-contained HTML pages (inline CSS and SVG, no scripts, no network) and their plots."""
