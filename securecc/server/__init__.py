"""The server side: the service's job stages, its protocols, admission, the job handler, cache and monitoring."""
