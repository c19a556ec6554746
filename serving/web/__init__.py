"""The web page of api.py, served at `/`: index.html, app.js and style.css, static, with no build step and
nothing fetched from another origin. `serving.web.browser` drives it in headless Chromium (the tests, and
`python -m serving.web.screenshot` for the docs)."""
