"""The dataplane's kernel maps as the worker writes them, for the tests of its pure-ish parts: the
token map (installs in one transaction, which refuses a token the map holds with another mark,
as the kernel does; replacements; renewals; deletes; reads with time left) and the subflow map."""


class KernelMaps:
    queue_mode = table_owner = "test"
    TIMEOUT = 3600.0  # seconds left of a token put in by a test itself

    def __init__(self, held=()):
        self.tokens: dict[int, int] = dict(held)
        self.timeouts: dict[int, float] = {}
        self.comments: dict[int, str] = {}
        self.subflows: dict[tuple, int] = {}
        self.calls: list[tuple] = []

    def add_tokens(self, tokens, comments=None, timeout=None):
        self.calls.append(("add", tokens))
        refused = [t for t, mark in tokens if self.tokens.get(t, mark) != mark]
        for token, mark in tokens:
            if token not in refused:
                self.tokens[token] = mark
                self.timeouts[token] = timeout or self.TIMEOUT
        self.comments.update((t, c) for t, c in (comments or {}).items() if t in self.tokens and t not in refused)
        return refused

    def replace_tokens(self, tokens, comments=None):
        self.calls.append(("replace", tokens))
        self.tokens.update(tokens)
        self.timeouts.update((t, self.TIMEOUT) for t, _ in tokens)
        self.comments.update((t, c) for t, c in (comments or {}).items() if t in self.tokens)

    def renew_tokens(self, tokens, comments=None):
        self.calls.append(("renew", tokens))
        self.tokens.update(tokens)
        self.timeouts.update((t, self.TIMEOUT) for t, _ in tokens)

    def delete_tokens(self, tokens):
        self.calls.append(("delete", tokens))
        for t in tokens:
            self.tokens.pop(t, None)

    def lookup_token(self, token):
        return self.tokens.get(token)

    def token_element(self, token):
        return (self.tokens[token], self.timeouts.get(token, self.TIMEOUT)) if token in self.tokens else None

    def read_tokens(self):
        return [(t, m, self.timeouts.get(t, self.TIMEOUT), self.comments.get(t)) for t, m in self.tokens.items()]

    def add_subflows(self, subflows):
        self.subflows.update(subflows)

    def delete_subflows(self, flows):
        for f in flows:
            self.subflows.pop(f, None)

    def sync_unavailable(self, marks, names):
        self.calls.append(("unavailable", marks))

    def sync_tables(self, tables):
        self.tables = tables
