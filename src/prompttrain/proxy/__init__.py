"""The proxy service: app factory, routes, forwarding, client auth, account selection and OAuth refresh."""
