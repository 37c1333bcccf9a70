"""One module per page group; each handler reads the gateway's own figures."""
