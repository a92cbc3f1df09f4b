//! The AI gateway's usage totals per API token, model and node.

use serde::{Deserialize, Serialize};

use sqlx::Row;

use super::{Store, StoreError};

/// AI gateway usage for one (token, model, node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub token: String,
    pub model: String,
    pub node: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

impl Store {
    /// Add counts to the AI usage totals, all or nothing.
    pub async fn add_ai_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO ai_usage (token, model, node, requests, prompt_tokens, completion_tokens) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (token, model, node) DO UPDATE SET \
                 requests = ai_usage.requests + excluded.requests, \
                 prompt_tokens = ai_usage.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = ai_usage.completion_tokens + excluded.completion_tokens",
            )
            .bind(&r.token)
            .bind(&r.model)
            .bind(&r.node)
            .bind(r.requests)
            .bind(r.prompt_tokens)
            .bind(r.completion_tokens)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The AI usage totals, by token, model and node.
    pub async fn ai_usage(&self) -> Result<Vec<UsageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT token, model, node, requests, prompt_tokens, completion_tokens FROM ai_usage \
             ORDER BY token, model, node",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    token: r.try_get("token")?,
                    model: r.try_get("model")?,
                    node: r.try_get("node")?,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                })
            })
            .collect()
    }
}
