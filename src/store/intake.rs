//! Group commit of new jobs. Every `POST /v1/jobs` is one small transaction; under load, what
//! bounds intake is not the rows but the transactions (each a turn of the one SQLite writer, or
//! a PostgreSQL commit) and the statements around them. So requests that arrive while a
//! transaction is at work wait for the next one together: a task takes whatever has queued,
//! up to [`MOST_AT_ONCE`] requests, and stores all their jobs in one transaction of a few
//! statements (see `jobs::insert_new_jobs`). SQLite has one such task, as it has one writer;
//! PostgreSQL has [`POSTGRES_LANES`], so that one transaction fills while another
//! commits, and where no request carries an Idempotency-Key and the jobs fit one message it
//! stores them with a single statement, atomic by itself, without BEGIN and COMMIT. Each
//! request is answered only once its jobs are committed, so an answered job is durable, as
//! before.
//!
//! A request must not fail because of another's mistake. A request whose Idempotency-Key was
//! taken over is turned away alone, before anything is inserted; any other failure of the
//! shared transaction rolls it back and every request of it is retried in a transaction of its
//! own, which gives each the answer it would have had alone.

use super::idempotency::complete_idempotency;
use super::jobs::{insert_new_jobs, insert_new_jobs_in_one_statement};
use super::webhook_endpoints::{WebhookEndpoint, insert_endpoint};
use super::{IdempotencyCompletion, NewJob, Store, StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

/// The most requests stored by one transaction: enough to carry any burst the HTTP server lets
/// in at once, few enough that the shared statements stay small.
const MOST_AT_ONCE: usize = 128;

/// Requests waiting for the next transaction at most; beyond it a request waits to queue.
const QUEUE: usize = 1024;

/// Transactions of new jobs under way at once on PostgreSQL, where writers run side by side:
/// while one waits on a round trip or its commit, the next can be filling. SQLite has one
/// writer, so one transaction at a time.
const POSTGRES_LANES: usize = 4;

/// One request's jobs, and where to tell it what became of them.
pub(super) struct Submission {
    jobs: Vec<NewJob>,
    idempotency: Option<IdempotencyCompletion>,
    /// The webhook given with the request, stored with its jobs.
    webhook: Option<WebhookEndpoint>,
    answer: oneshot::Sender<StoreResult<()>>,
}

/// The way into the group-commit task: a queue it drains. The task ends when every store that
/// could queue to it is gone.
pub(super) type Queue = mpsc::Sender<Submission>;

impl Store {
    /// Stores new jobs as `pending`, each with its first history row, and the idempotency
    /// record of the request that made them, atomically; answers once they are committed.
    /// Concurrent calls share a transaction (see the module's comment).
    pub async fn create_jobs(
        &self,
        jobs: Vec<NewJob>,
        idempotency: Option<IdempotencyCompletion>,
        webhook: Option<WebhookEndpoint>,
    ) -> StoreResult<()> {
        let (answer, answered) = oneshot::channel();
        let submission = Submission {
            jobs,
            idempotency,
            webhook,
            answer,
        };
        let gone = || StoreError::Unavailable("the job intake has stopped".into());
        self.intake_queue()
            .send(submission)
            .await
            .map_err(|_| gone())?;
        answered
            .await
            .map_err(|_| StoreError::Unavailable("the job intake did not answer".into()))?
    }

    /// The queue to the group-commit task, started on first use.
    fn intake_queue(&self) -> &Queue {
        self.intake.get_or_init(|| {
            let (queue, waiting) = mpsc::channel(QUEUE);
            let waiting = std::sync::Arc::new(tokio::sync::Mutex::new(waiting));
            let lanes = match self.pools {
                super::Pools::Postgres(_) => POSTGRES_LANES,
                super::Pools::Sqlite(_) => 1,
            };
            for _ in 0..lanes {
                // A store of its own that shares the pools but not this queue, so that the
                // task does not keep its own queue open.
                tokio::spawn(lane(self.without_tasks(), waiting.clone()));
            }
            queue
        })
    }

    /// Stores one request's jobs in a transaction of their own.
    async fn create_jobs_alone(&self, submission: &Submission) -> StoreResult<()> {
        let Submission {
            jobs,
            idempotency,
            webhook,
            ..
        } = submission;
        if idempotency.is_none()
            && webhook.is_none()
            && insert_new_jobs_in_one_statement(self, &jobs.iter().collect::<Vec<_>>()).await?
        {
            return Ok(());
        }
        let mut tx = self.writer().begin().await?;
        insert_new_jobs(&mut tx, jobs).await?;
        if let Some(webhook) = webhook {
            insert_endpoint(&mut tx, webhook).await?;
        }
        if let Some(done) = idempotency {
            complete_idempotency(&mut tx, done).await?;
        }
        tx.commit().await
    }

    /// Stores several requests' jobs in one transaction. Answers, per request, whether its
    /// jobs were stored or why it was turned away; an error means nothing was stored.
    async fn create_jobs_together(
        &self,
        submissions: &[Submission],
    ) -> StoreResult<Vec<StoreResult<()>>> {
        if submissions
            .iter()
            .all(|s| s.idempotency.is_none() && s.webhook.is_none())
        {
            let jobs: Vec<&NewJob> = submissions.iter().flat_map(|s| &s.jobs).collect();
            if insert_new_jobs_in_one_statement(self, &jobs).await? {
                return Ok(submissions.iter().map(|_| Ok(())).collect());
            }
        }
        let mut tx = self.writer().begin().await?;
        let mut turned_away = vec![None; submissions.len()];
        for (index, submission) in submissions.iter().enumerate() {
            let Some(done) = &submission.idempotency else {
                continue;
            };
            match complete_idempotency(&mut tx, done).await {
                Ok(()) => {}
                // Its key went to another request: this one alone creates nothing.
                Err(StoreError::UniqueTaken(why)) => turned_away[index] = Some(why),
                Err(other) => return Err(other),
            }
        }
        let accepted: Vec<&NewJob> = submissions
            .iter()
            .zip(&turned_away)
            .filter(|(_, refused)| refused.is_none())
            .flat_map(|(submission, _)| &submission.jobs)
            .collect();
        insert_new_jobs(&mut tx, accepted).await?;
        for (submission, _) in submissions
            .iter()
            .zip(&turned_away)
            .filter(|(_, refused)| refused.is_none())
        {
            if let Some(webhook) = &submission.webhook {
                insert_endpoint(&mut tx, webhook).await?;
            }
        }
        tx.commit().await?;
        Ok(turned_away
            .into_iter()
            .map(|refused| match refused {
                Some(why) => Err(StoreError::UniqueTaken(why)),
                None => Ok(()),
            })
            .collect())
    }
}

/// One lane of group commit, started again should it panic: a bug met by one batch must not
/// leave every later request without a way in. The requests of the batch it was storing are
/// told the intake failed (their answers are dropped), as a crash would have left them.
async fn lane(
    store: Store,
    waiting: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Submission>>>,
) {
    loop {
        match tokio::spawn(group_commit(store.clone(), waiting.clone())).await {
            Err(failure) if failure.is_panic() => {
                tracing::error!("a group-commit lane panicked; starting it again");
            }
            _ => return,
        }
    }
}

/// Takes whatever has queued, stores it, answers, and goes again, until no store is left. The
/// lanes take turns at the queue; each holds it only while taking a batch.
async fn group_commit(
    store: Store,
    waiting: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Submission>>>,
) {
    let mut batch = Vec::with_capacity(MOST_AT_ONCE);
    loop {
        let taken = waiting
            .lock()
            .await
            .recv_many(&mut batch, MOST_AT_ONCE)
            .await;
        if taken == 0 {
            break;
        }
        // A request whose client left is still stored (its answer may already be on the
        // wire elsewhere, and it may carry an Idempotency-Key a retry will replay).
        if batch.len() == 1 {
            let one = batch.pop().expect("one submission");
            let result = store.create_jobs_alone(&one).await;
            let _ = one.answer.send(result);
            continue;
        }
        match store.create_jobs_together(&batch).await {
            Ok(results) => {
                for (submission, result) in batch.drain(..).zip(results) {
                    let _ = submission.answer.send(result);
                }
            }
            Err(shared) => {
                tracing::debug!(error = %shared, requests = batch.len(),
                    "a shared intake transaction failed; storing its requests one by one");
                for submission in batch.drain(..) {
                    let result = store.create_jobs_alone(&submission).await;
                    let _ = submission.answer.send(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::JobKind;
    use crate::store::{IdempotencyClaim, IdempotencyState};
    use uuid::Uuid;

    fn new_job(tenant: Uuid, n: usize) -> NewJob {
        NewJob {
            id: Uuid::now_v7(),
            tenant,
            kind: JobKind::Raw,
            avatar_id: n.is_multiple_of(2).then(Uuid::now_v7),
            batch_id: None,
            endpoint: "fal-ai/flux-lora".into(),
            input: serde_json::json!({"prompt": format!("ü \"{n}\""), "seed": u64::MAX}),
            sandbox: n.is_multiple_of(3),
            idempotency_key: None,
            created_at: crate::domain::now(),
        }
    }

    fn submission(jobs: Vec<NewJob>, idempotency: Option<IdempotencyCompletion>) -> Submission {
        Submission {
            jobs,
            idempotency,
            webhook: None,
            answer: oneshot::channel().0,
        }
    }

    async fn claim(store: &Store, tenant: Uuid, key: &str) -> Uuid {
        let now = crate::domain::now();
        let token = Uuid::new_v4();
        let state = store
            .claim_idempotency_key(&IdempotencyClaim {
                tenant,
                key: key.into(),
                token,
                fingerprint: "f".into(),
                now,
                expires_before: now - chrono::TimeDelta::hours(24),
                abandoned_before: now - chrono::TimeDelta::seconds(10),
            })
            .await
            .unwrap();
        assert_eq!(state, IdempotencyState::Claimed);
        token
    }

    #[tokio::test]
    async fn a_request_whose_key_was_taken_over_is_turned_away_alone() {
        let (store, path) = crate::store::scratch_store().await;
        let (key, _) = store.issue_api_key("t").await.unwrap();
        let held = claim(&store, key.id, "held").await;
        claim(&store, key.id, "lost").await;
        let completion = |key_name: &str, token: Uuid| IdempotencyCompletion {
            tenant: key.id,
            key: key_name.into(),
            token,
            status: 202,
            body: format!("{{\"for\":\"{key_name}\"}}"),
        };
        let batch = vec![
            submission(vec![new_job(key.id, 0), new_job(key.id, 1)], None),
            // Its claim went to another request (another token holds the key).
            submission(
                vec![new_job(key.id, 2)],
                Some(completion("lost", Uuid::new_v4())),
            ),
            submission(vec![new_job(key.id, 3)], Some(completion("held", held))),
        ];
        let results = store.create_jobs_together(&batch).await.unwrap();

        assert!(matches!(results[1], Err(StoreError::UniqueTaken(_))));
        for (index, submission) in batch.iter().enumerate() {
            let stored = store.get_job(key.id, submission.jobs[0].id).await.unwrap();
            if index == 1 {
                assert_eq!(stored, None, "the turned-away request's job is not stored");
                continue;
            }
            assert!(results[index].is_ok());
            for asked in &submission.jobs {
                let stored = store.get_job(key.id, asked.id).await.unwrap();
                assert_eq!(
                    stored,
                    Some(asked.to_pending_job()),
                    "read back as answered"
                );
                assert_eq!(store.job_events(asked.id).await.unwrap().len(), 1);
            }
        }
        let replay = store
            .claim_idempotency_key(&IdempotencyClaim {
                tenant: key.id,
                key: "held".into(),
                token: Uuid::new_v4(),
                fingerprint: "f".into(),
                now: crate::domain::now(),
                expires_before: crate::domain::now() - chrono::TimeDelta::hours(24),
                abandoned_before: crate::domain::now() - chrono::TimeDelta::seconds(10),
            })
            .await
            .unwrap();
        assert_eq!(
            replay,
            IdempotencyState::Completed {
                status: 202,
                body: "{\"for\":\"held\"}".into()
            }
        );
        crate::store::forget_scratch_store(store, path).await;
    }
}
