-- AI gateway usage: requests and tokens per API token (or dashboard user), model and node,
-- summed over the controller's life (the gateway adds what it counted every few seconds).
CREATE TABLE ai_usage (
    token             TEXT NOT NULL,
    model             TEXT NOT NULL,
    node              TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (token, model, node)
);
