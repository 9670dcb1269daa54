"""The C backend: jinja2 templates → C99 sources (`codegen`), gcc builds and runs (`build`), arena plan."""
