"""The website: Jinja templates (``templates/``), static files (``static/``), the environment
that renders them (:mod:`opulon.web.site`) and the data they draw (:mod:`opulon.web.views`)."""
