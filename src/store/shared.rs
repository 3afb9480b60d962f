//! The store's code shared by both backends. SQLite and PostgreSQL run the same logic and
//! almost the same SQL; each backend module supplies what differs: `Db` (its sqlx database),
//! `MIGRATOR`, `begin_write` (how a read-then-write transaction starts) and a `sql` module with
//! the queries whose dialect differs. These macros expand inside each backend module, where
//! those names resolve.

/// Every `Store` method that is the same on both backends.
macro_rules! shared_store_methods {
    () => {
        pub async fn migrate(&self) -> StoreResult<()> {
            MIGRATOR.run(&self.pool).await?;
            Ok(())
        }

        pub async fn readiness(&self) -> StoreResult<Readiness> {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            let applied: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&self.pool)
                    .await
                    .unwrap_or_default();
            Ok(Readiness {
                pending_migrations: MIGRATOR
                    .iter()
                    .map(|m| m.version)
                    .filter(|v| !applied.contains(v))
                    .collect(),
            })
        }

        pub async fn close(&self) {
            self.pool.close().await;
        }

        pub async fn create_api_key(&self, key: &ApiKeyRecord, hash: &str) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO api_keys (id, name, key_hash, prefix, created_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(key.id)
            .bind(&key.name)
            .bind(hash)
            .bind(&key.prefix)
            .bind(key.created_at)
            .bind(key.revoked_at)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        pub async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
            Ok(sqlx::query_as(
                "SELECT id, name, prefix, created_at, revoked_at FROM api_keys ORDER BY id",
            )
            .fetch_all(&self.pool)
            .await?)
        }

        pub async fn revoke_api_key(&self, id_or_prefix: &str, at: DateTime<Utc>) -> StoreResult<bool> {
            let id = Uuid::parse_str(id_or_prefix).ok();
            let mut tx = self.begin_write().await?;
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM api_keys WHERE (id = $1 OR prefix = $2) AND revoked_at IS NULL",
            )
            .bind(id)
            .bind(id_or_prefix)
            .fetch_all(&mut *tx)
            .await?;
            let [only] = ids.as_slice() else {
                return Ok(false);
            };
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2")
                .bind(at)
                .bind(only)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        }

        pub async fn find_live_api_key(&self, hash: &str) -> StoreResult<Option<ApiKeyCredential>> {
            Ok(sqlx::query_as(
                "SELECT id, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?)
        }

        pub async fn create_jobs(
            &self,
            jobs: &[NewJob],
            idempotency: Option<&IdempotencyCompletion>,
        ) -> StoreResult<Vec<Job>> {
            let mut tx = self.begin_write().await?;
            let created = insert_jobs(&mut tx, jobs).await?;
            if let Some(done) = idempotency {
                complete_idempotency(&mut tx, done).await?;
            }
            tx.commit().await?;
            Ok(created)
        }

        pub async fn create_avatar(
            &self,
            avatar: &Avatar,
            idempotency: Option<&IdempotencyCompletion>,
        ) -> StoreResult<()> {
            let mut tx = self.begin_write().await?;
            sqlx::query(
                "INSERT INTO avatars (id, tenant, name, kind, trigger_phrase, status, created_at, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            )
            .bind(avatar.id)
            .bind(avatar.tenant)
            .bind(&avatar.name)
            .bind(avatar.kind.as_str())
            .bind(&avatar.trigger_phrase)
            .bind(avatar.status.as_str())
            .bind(avatar.created_at)
            .execute(&mut *tx)
            .await?;
            if let Some(done) = idempotency {
                complete_idempotency(&mut tx, done).await?;
            }
            tx.commit().await?;
            Ok(())
        }

        pub async fn get_avatar(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<Avatar>> {
            let row: Option<AvatarRow> = sqlx::query_as(concat!(
                "SELECT ",
                avatar_columns!(),
                " FROM avatars WHERE id = $1 AND tenant = $2"
            ))
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
            row.map(Avatar::try_from).transpose()
        }

        pub async fn list_avatars(
            &self,
            tenant: Uuid,
            after: Option<Uuid>,
            limit: u32,
        ) -> StoreResult<Vec<Avatar>> {
            let rows: Vec<AvatarRow> = sqlx::query_as(sql::LIST_AVATARS)
            .bind(tenant)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(Avatar::try_from).collect()
        }

        /// Deletes an avatar and its photos' rows; answers the photos, whose bytes the caller removes.
        /// Deletes an avatar and its photos' rows; answers what the caller must clean up: the
        /// files, and the training to cancel if one was running. The avatar's row is locked
        /// first, so a training starting at the same moment is seen.
        pub async fn delete_avatar(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<DeletedAvatar>> {
            let mut tx = self.begin_write().await?;
            let locked: Option<(Uuid, String, Option<Uuid>, Option<String>)> =
                sqlx::query_as(sql::LOCK_AVATAR).bind(id).fetch_optional(&mut *tx).await?;
            let Some((owner, status, training_job_id, lora_copy_key)) = locked else {
                return Ok(None);
            };
            if owner != tenant {
                return Ok(None);
            }
            let photos: Vec<Photo> = sqlx::query_as(concat!(
                "SELECT ",
                photo_columns!(),
                " FROM photos WHERE avatar_id = $1"
            ))
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM avatars WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(DeletedAvatar {
                photos,
                training_to_cancel: training_job_id.filter(|_| status == "training"),
                lora_copy_key,
            }))
        }

        pub async fn add_photo(&self, photo: &Photo, max_photos: u32) -> StoreResult<PhotoAdded> {
            let mut tx = self.begin_write().await?;
            // The avatar's row is locked first: two uploads at once then count and compare
            // one after the other, and an avatar deleted meanwhile is seen.
            let locked: Option<(Uuid, String, Option<Uuid>, Option<String>)> = sqlx::query_as(sql::LOCK_AVATAR)
                .bind(photo.avatar_id)
                .fetch_optional(&mut *tx)
                .await?;
            if locked.is_none() {
                return Ok(PhotoAdded::NoAvatar);
            }
            let existing: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM photos WHERE avatar_id = $1 AND sha256 = $2")
                    .bind(photo.avatar_id)
                    .bind(&photo.sha256)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(existing) = existing {
                return Ok(PhotoAdded::Duplicate { existing });
            }
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM photos WHERE avatar_id = $1")
                .bind(photo.avatar_id)
                .fetch_one(&mut *tx)
                .await?;
            if count >= i64::from(max_photos) {
                return Ok(PhotoAdded::Full);
            }
            sqlx::query(
                "INSERT INTO photos (id, avatar_id, sha256, content_type, width, height, bytes, \
                 storage_key, file_name, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(photo.id)
            .bind(photo.avatar_id)
            .bind(&photo.sha256)
            .bind(&photo.content_type)
            .bind(photo.width)
            .bind(photo.height)
            .bind(photo.bytes)
            .bind(&photo.storage_key)
            .bind(&photo.file_name)
            .bind(photo.created_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(PhotoAdded::Added)
        }

        pub async fn list_photos(&self, avatar_id: Uuid) -> StoreResult<Vec<Photo>> {
            Ok(sqlx::query_as(concat!(
                "SELECT ",
                photo_columns!(),
                " FROM photos WHERE avatar_id = $1 ORDER BY id"
            ))
            .bind(avatar_id)
            .fetch_all(&self.pool)
            .await?)
        }

        pub async fn delete_photo(
            &self,
            avatar_id: Uuid,
            photo_id: Uuid,
        ) -> StoreResult<Option<Photo>> {
            let mut tx = self.begin_write().await?;
            let photo: Option<Photo> = sqlx::query_as(concat!(
                "SELECT ",
                photo_columns!(),
                " FROM photos WHERE avatar_id = $1 AND id = $2"
            ))
            .bind(avatar_id)
            .bind(photo_id)
            .fetch_optional(&mut *tx)
            .await?;
            if photo.is_some() {
                sqlx::query("DELETE FROM photos WHERE id = $1")
                    .bind(photo_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(photo)
        }

        /// Marks the avatar training with this job and stores the job, in one transaction; refused
        /// while another training of the avatar runs.
        pub async fn start_training(
            &self,
            tenant: Uuid,
            job: &NewJob,
            idempotency: Option<&IdempotencyCompletion>,
        ) -> StoreResult<TrainingStart> {
            let mut tx = self.begin_write().await?;
            let avatar_id = job.avatar_id.unwrap_or_default();
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM avatars WHERE id = $1 AND tenant = $2")
                    .bind(avatar_id)
                    .bind(tenant)
                    .fetch_optional(&mut *tx)
                    .await?;
            match status.as_deref() {
                None => return Ok(TrainingStart::NoAvatar),
                Some("training") => return Ok(TrainingStart::Busy),
                Some(_) => {}
            }
            let marked = sqlx::query(
                "UPDATE avatars SET status = 'training', training_job_id = $1, updated_at = $2 \
                 WHERE id = $3 AND status <> 'training'",
            )
            .bind(job.id)
            .bind(job.created_at)
            .bind(avatar_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if marked == 0 {
                return Ok(TrainingStart::Busy);
            }
            let mut created = insert_jobs(&mut tx, std::slice::from_ref(job)).await?;
            if let Some(done) = idempotency {
                complete_idempotency(&mut tx, done).await?;
            }
            tx.commit().await?;
            Ok(TrainingStart::Started(Box::new(created.remove(0))))
        }

        pub async fn create_batch(
            &self,
            batch: &Batch,
            jobs: &[NewJob],
            idempotency: Option<&IdempotencyCompletion>,
        ) -> StoreResult<Vec<Job>> {
            let mut tx = self.begin_write().await?;
            sqlx::query(
                "INSERT INTO batches (id, tenant, avatar_id, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(batch.id)
            .bind(batch.tenant)
            .bind(batch.avatar_id)
            .bind(batch.created_at)
            .execute(&mut *tx)
            .await?;
            let created = insert_jobs(&mut tx, jobs).await?;
            if let Some(done) = idempotency {
                complete_idempotency(&mut tx, done).await?;
            }
            tx.commit().await?;
            Ok(created)
        }

        /// Avatars whose current LoRA file has no copy of ours yet and is not deferred past
        /// `now` (a failed copy is deferred, so a few dead URLs never hold up the others).
        pub async fn avatars_missing_lora_copy(
            &self,
            now: DateTime<Utc>,
            limit: u32,
        ) -> StoreResult<Vec<Avatar>> {
            let rows: Vec<AvatarRow> = sqlx::query_as(concat!(
                "SELECT ",
                avatar_columns!(),
                " FROM avatars WHERE lora_url IS NOT NULL \
                  AND (lora_copy_url IS NULL OR lora_copy_url <> lora_url) \
                  AND lora_next_try_at <= $1 ORDER BY lora_next_try_at LIMIT $2"
            ))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(Avatar::try_from).collect()
        }

        /// Records the copy of `lora_url` (FAL served it at `at`; the next check is due at
        /// `next_check_at`), unless a newer training replaced that URL meanwhile.
        pub async fn record_lora_copy(
            &self,
            avatar_id: Uuid,
            lora_url: &str,
            copy: &LoraCopy,
            at: DateTime<Utc>,
            next_check_at: DateTime<Utc>,
        ) -> StoreResult<CopyRecorded> {
            let mut tx = self.begin_write().await?;
            let locked: Option<(Uuid, String, Option<Uuid>, Option<String>)> =
                sqlx::query_as(sql::LOCK_AVATAR).bind(avatar_id).fetch_optional(&mut *tx).await?;
            let Some((_, _, _, previous)) = locked else {
                return Ok(CopyRecorded::Stale { current: None });
            };
            let written = sqlx::query(
                "UPDATE avatars SET lora_copy_key = $3, lora_copy_sha256 = $4, \
                 lora_copy_bytes = $5, lora_copy_url = $2, lora_checked_at = $6, \
                 lora_next_try_at = $7 WHERE id = $1 AND lora_url = $2",
            )
            .bind(avatar_id)
            .bind(lora_url)
            .bind(&copy.key)
            .bind(&copy.sha256)
            .bind(copy.bytes)
            .bind(at)
            .bind(next_check_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(if written == 1 {
                CopyRecorded::Kept {
                    replaced: previous.filter(|key| *key != copy.key),
                }
            } else {
                CopyRecorded::Stale { current: previous }
            })
        }

        /// Avatars whose kept LoRA file is due a check that FAL still serves it.
        pub async fn avatars_due_lora_check(
            &self,
            now: DateTime<Utc>,
            limit: u32,
        ) -> StoreResult<Vec<Avatar>> {
            let rows: Vec<AvatarRow> = sqlx::query_as(concat!(
                "SELECT ",
                avatar_columns!(),
                " FROM avatars WHERE lora_url IS NOT NULL AND lora_copy_url = lora_url \
                  AND lora_next_try_at <= $1 ORDER BY lora_next_try_at LIMIT $2"
            ))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(Avatar::try_from).collect()
        }

        /// FAL served `lora_url` at `at`; the next check is due at `next_check_at`. Nothing
        /// changes if the avatar's weights did.
        pub async fn record_lora_check(
            &self,
            avatar_id: Uuid,
            lora_url: &str,
            at: DateTime<Utc>,
            next_check_at: DateTime<Utc>,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE avatars SET lora_checked_at = $3, lora_next_try_at = $4 \
                 WHERE id = $1 AND lora_url = $2",
            )
            .bind(avatar_id)
            .bind(lora_url)
            .bind(at)
            .bind(next_check_at)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        /// Copying or checking `lora_url` failed: no worker tries it again before `until`.
        pub async fn defer_lora_work(
            &self,
            avatar_id: Uuid,
            lora_url: &str,
            until: DateTime<Utc>,
        ) -> StoreResult<()> {
            sqlx::query("UPDATE avatars SET lora_next_try_at = $3 WHERE id = $1 AND lora_url = $2")
                .bind(avatar_id)
                .bind(lora_url)
                .bind(until)
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        /// Points the avatar at a new upload (made at `at`) of the weights its copy holds,
        /// unless a training changed them meanwhile; answers whether it did.
        pub async fn replace_lora_url(
            &self,
            avatar_id: Uuid,
            expired_url: &str,
            new_url: &str,
            at: DateTime<Utc>,
            next_check_at: DateTime<Utc>,
        ) -> StoreResult<bool> {
            let written = sqlx::query(
                "UPDATE avatars SET lora_url = $3, lora_copy_url = $3, lora_checked_at = $4, \
                 lora_next_try_at = $5, updated_at = $4 \
                 WHERE id = $1 AND lora_url = $2 AND lora_copy_url = $2",
            )
            .bind(avatar_id)
            .bind(expired_url)
            .bind(new_url)
            .bind(at)
            .bind(next_check_at)
            .execute(&self.pool)
            .await?
            .rows_affected();
            Ok(written == 1)
        }

        pub async fn get_batch(
            &self,
            tenant: Uuid,
            id: Uuid,
        ) -> StoreResult<Option<(Batch, Vec<Job>)>> {
            let batch: Option<Batch> = sqlx::query_as(
                "SELECT id, tenant, avatar_id, created_at FROM batches WHERE id = $1 AND tenant = $2",
            )
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
            let Some(batch) = batch else {
                return Ok(None);
            };
            let rows: Vec<JobRow> = sqlx::query_as(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE batch_id = $1 ORDER BY id"
            ))
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
            let jobs = rows
                .into_iter()
                .map(Job::try_from)
                .collect::<StoreResult<_>>()?;
            Ok(Some((batch, jobs)))
        }

        pub async fn get_job(&self, tenant: Option<Uuid>, id: Uuid) -> StoreResult<Option<Job>> {
            let row: Option<JobRow> = sqlx::query_as(sql::GET_JOB)
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
            row.map(Job::try_from).transpose()
        }

        /// How many jobs there are in each state, across tenants (for metrics).
    pub async fn count_jobs_by_status(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn job_events(&self, job_id: Uuid) -> StoreResult<Vec<JobEventRecord>> {
            let rows: Vec<JobEventRow> = sqlx::query_as(
                "SELECT at, from_status, to_status, source, detail FROM job_events \
                 WHERE job_id = $1 ORDER BY id",
            )
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(JobEventRecord::try_from).collect()
        }

        pub async fn list_jobs(&self, tenant: Uuid, filter: &JobFilter) -> StoreResult<Vec<Job>> {
            let rows: Vec<JobRow> = sqlx::query_as(sql::LIST_JOBS)
            .bind(tenant)
            .bind(filter.kind.map(|k| k.as_str()))
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.avatar_id)
            .bind(filter.after)
            .bind(i64::from(filter.limit))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(Job::try_from).collect()
        }

        /// One compare-and-set write: applies only while the job has the status and FAL request id
        /// it was read with. `None` when someone else moved it first.
        pub(crate) async fn update_job(&self, update: &JobUpdate) -> StoreResult<Option<Job>> {
            let mut tx = self.begin_write().await?;
            let (set_error, error_code, error_message, error_detail) = update.error_columns();
            let fal = update.fal.clone().unwrap_or_default();
            let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            let written = sqlx::query(sql::UPDATE_JOB)
            .bind(update.job_id)
            .bind(update.expect_status.as_str())
            .bind(update.status.as_str())
            .bind(update.at)
            .bind(non_empty(&fal.request_id))
            .bind(fal.status_url)
            .bind(fal.response_url)
            .bind(fal.cancel_url)
            .bind(update.queue_position)
            .bind(update.result.as_ref().map(Json))
            .bind(set_error)
            .bind(error_code)
            .bind(error_message)
            .bind(error_detail)
            .bind(update.status.is_terminal())
            .bind(update.next_attempt_at)
            .bind(update.release_lease)
            .bind(update.cancel_requested_at)
            .bind(update.cancel_forwarded_at)
            .bind(&update.expect_request_id)
            .bind(update.touch)
            .bind(update.submit_mark == SubmitMark::Clear)
            .bind(match update.submit_mark {
                SubmitMark::Set(at) => Some(at),
                SubmitMark::Keep | SubmitMark::Clear => None,
            })
            .bind(!update.expect_submit_sent)
            .bind(update.expect_attempts)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if written == 0 {
                return Ok(None);
            }
            if let Some((source, detail)) = &update.event {
                insert_event(
                    &mut tx,
                    update.job_id,
                    update.at,
                    Some(update.expect_status),
                    update.status,
                    *source,
                    detail.as_ref(),
                )
                .await?;
            }
            if let Some(callback) = &update.callback {
                insert_callback(&mut tx, callback).await?;
            }
            if let (Some(outcome), Some(avatar_id)) = (&update.avatar, update.avatar_id) {
                apply_avatar_outcome(&mut tx, avatar_id, update.job_id, outcome, update.at).await?;
            }
            let row: JobRow = sqlx::query_as(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE id = $1"
            ))
            .bind(update.job_id)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Job::try_from(row).map(Some)
        }

        /// Leases up to `limit` due jobs of one kind of work until `lease_until`. A lease that ran
        /// out (its holder died) makes the job claimable again.
        pub async fn claim_jobs(
            &self,
            kind: ClaimKind,
            sandbox: bool,
            now: DateTime<Utc>,
            lease_until: DateTime<Utc>,
            limit: u32,
        ) -> StoreResult<Vec<Job>> {
            let mut tx = self.begin_write().await?;
            let rows: Vec<JobRow> = match kind {
                ClaimKind::Submit => sqlx::query_as(sql::CLAIM_SUBMIT),
                ClaimKind::Poll => sqlx::query_as(sql::CLAIM_POLL),
            }
            .bind(now)
            .bind(lease_until)
            .bind(i64::from(limit))
            .bind(sandbox)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            rows.into_iter().map(Job::try_from).collect()
        }

        /// The earliest time a job of this kind of work falls due, for workers to sleep until.
        pub async fn next_due(
            &self,
            kind: ClaimKind,
            sandbox: bool,
        ) -> StoreResult<Option<DateTime<Utc>>> {
            let query = match kind {
                ClaimKind::Submit => sqlx::query_scalar(sql::NEXT_DUE_SUBMIT),
                ClaimKind::Poll => sqlx::query_scalar(sql::NEXT_DUE_POLL),
            };
            Ok(query.bind(sandbox).fetch_one(&self.pool).await?)
        }

        pub async fn job_holding_request(&self, request_id: &str) -> StoreResult<Option<Uuid>> {
            Ok(sqlx::query_scalar("SELECT id FROM jobs WHERE fal_request_id = $1")
                .bind(request_id)
                .fetch_optional(&self.pool)
                .await?)
        }

        pub async fn insert_callback(&self, callback: &NewCallback) -> StoreResult<()> {
            let mut tx = self.begin_write().await?;
            insert_callback(&mut tx, callback).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn list_callbacks(&self, job_id: Uuid) -> StoreResult<Vec<CallbackRecord>> {
            Ok(sqlx::query_as(
                "SELECT id, received_at, request_id, body, signature, outcome FROM fal_callbacks \
                 WHERE job_id = $1 ORDER BY id",
            )
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?)
        }

        pub async fn claim_idempotency_key(
            &self,
            claim: &IdempotencyClaim,
        ) -> StoreResult<IdempotencyState> {
            let mut tx = self.begin_write().await?;
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys \
                 (tenant, key, fingerprint, created_at, locked_at, claim_token) \
                 VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT (tenant, key) DO NOTHING",
            )
            .bind(claim.tenant)
            .bind(&claim.key)
            .bind(&claim.fingerprint)
            .bind(claim.now)
            .bind(claim.token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                tx.commit().await?;
                return Ok(IdempotencyState::Claimed);
            }
            let existing: IdempotencyRow = sqlx::query_as(
                "SELECT fingerprint, response_status, response_body, created_at, locked_at \
                 FROM idempotency_keys WHERE tenant = $1 AND key = $2",
            )
            .bind(claim.tenant)
            .bind(&claim.key)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(state) = existing.judge(claim) {
                return Ok(state);
            }
            // Expired or abandoned: take it over, unless someone else just did.
            let taken = sqlx::query(
                "UPDATE idempotency_keys SET fingerprint = $3, response_status = NULL, \
                 response_body = NULL, created_at = $4, locked_at = $4, claim_token = $6 \
                 WHERE tenant = $1 AND key = $2 AND locked_at = $5",
            )
            .bind(claim.tenant)
            .bind(&claim.key)
            .bind(&claim.fingerprint)
            .bind(claim.now)
            .bind(existing.locked_at)
            .bind(claim.token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(if taken == 1 {
                IdempotencyState::Claimed
            } else {
                IdempotencyState::InFlight
            })
        }

        pub async fn renew_idempotency_key(
            &self,
            tenant: Uuid,
            key: &str,
            token: Uuid,
            at: DateTime<Utc>,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE idempotency_keys SET locked_at = $3 \
                 WHERE tenant = $1 AND key = $2 AND response_status IS NULL \
                 AND claim_token = $4",
            )
            .bind(tenant)
            .bind(key)
            .bind(at)
            .bind(token)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        pub async fn release_idempotency_key(
            &self,
            tenant: Uuid,
            key: &str,
            token: Uuid,
        ) -> StoreResult<()> {
            sqlx::query(
                "DELETE FROM idempotency_keys \
                 WHERE tenant = $1 AND key = $2 AND response_status IS NULL \
                 AND claim_token = $3",
            )
            .bind(tenant)
            .bind(key)
            .bind(token)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        pub async fn complete_idempotency_key(
            &self,
            completion: &IdempotencyCompletion,
        ) -> StoreResult<()> {
            let mut tx = self.begin_write().await?;
            complete_idempotency(&mut tx, completion).await?;
            tx.commit().await?;
            Ok(())
        }
    };
}
pub(super) use shared_store_methods;

/// The transaction helpers both backends share.
macro_rules! shared_store_helpers {
    () => {
        async fn insert_event(
            tx: &mut sqlx::Transaction<'static, Db>,
            job_id: Uuid,
            at: DateTime<Utc>,
            from: Option<JobStatus>,
            to: JobStatus,
            source: EventSource,
            detail: Option<&serde_json::Value>,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO job_events (job_id, at, from_status, to_status, source, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(job_id)
            .bind(at)
            .bind(from.map(|s| s.as_str()))
            .bind(to.as_str())
            .bind(source.as_str())
            .bind(detail.map(Json))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        async fn insert_jobs(
            tx: &mut sqlx::Transaction<'static, Db>,
            jobs: &[NewJob],
        ) -> StoreResult<Vec<Job>> {
            let mut created = Vec::with_capacity(jobs.len());
            for new in jobs {
                let job = new.to_pending_job();
                sqlx::query(
                    "INSERT INTO jobs (id, tenant, kind, avatar_id, endpoint, input, status, attempts, \
                     next_attempt_at, sandbox, idempotency_key, created_at, updated_at, batch_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11, $11, $12)",
                )
                .bind(job.id)
                .bind(job.tenant)
                .bind(job.kind.as_str())
                .bind(job.avatar_id)
                .bind(&job.endpoint)
                .bind(Json(&job.input))
                .bind(job.status.as_str())
                .bind(job.next_attempt_at)
                .bind(job.sandbox)
                .bind(&job.idempotency_key)
                .bind(job.created_at)
                .bind(job.batch_id)
                .execute(&mut **tx)
                .await?;
                insert_event(
                    tx,
                    job.id,
                    job.created_at,
                    None,
                    job.status,
                    EventSource::Api,
                    None,
                )
                .await?;
                created.push(job);
            }
            Ok(created)
        }

        /// Moves the avatar whose current training is `job_id` according to how that training ended.
        async fn apply_avatar_outcome(
            tx: &mut sqlx::Transaction<'static, Db>,
            avatar_id: Uuid,
            job_id: Uuid,
            outcome: &AvatarOutcome,
            at: DateTime<Utc>,
        ) -> StoreResult<()> {
            let query = match outcome {
                AvatarOutcome::Ready(artifact) => {
                    let (lora, config, finetune) = match artifact {
                        TrainedArtifact::Lora { url, config_url } => {
                            (Some(url.as_str()), config_url.as_deref(), None)
                        }
                        TrainedArtifact::Finetune { id } => (None, None, Some(id.as_str())),
                    };
                    sqlx::query(
                        "UPDATE avatars SET status = 'ready', lora_url = $3, lora_config_url = $4, \
                         finetune_id = $5, error_code = NULL, error_message = NULL, updated_at = $6, \
                         lora_checked_at = $7, lora_next_try_at = $7 \
                         WHERE id = $1 AND training_job_id = $2",
                    )
                    .bind(avatar_id)
                    .bind(job_id)
                    .bind(lora)
                    .bind(config)
                    .bind(finetune)
                    .bind(at)
                    // FAL served the LoRA file just now, in its result; its copy is due at once.
                    .bind(lora.map(|_| at))
                }
                AvatarOutcome::Failed { code, message } => sqlx::query(
                    "UPDATE avatars SET status = CASE WHEN lora_url IS NOT NULL OR finetune_id IS NOT NULL \
                     THEN 'ready' ELSE 'failed' END, error_code = $3, error_message = $4, updated_at = $5 \
                     WHERE id = $1 AND training_job_id = $2",
                )
                .bind(avatar_id)
                .bind(job_id)
                .bind(code.as_str())
                .bind(message)
                .bind(at),
                AvatarOutcome::Canceled => sqlx::query(
                    "UPDATE avatars SET status = CASE WHEN lora_url IS NOT NULL OR finetune_id IS NOT NULL \
                     THEN 'ready' ELSE 'draft' END, updated_at = $3 \
                     WHERE id = $1 AND training_job_id = $2",
                )
                .bind(avatar_id)
                .bind(job_id)
                .bind(at),
                // The LoRA file is checked at once rather than at its next turn.
                AvatarOutcome::GenerationFailed => sqlx::query(
                    "UPDATE avatars SET lora_next_try_at = $2 WHERE id = $1 \
                     AND lora_url IS NOT NULL AND lora_copy_url = lora_url AND lora_next_try_at > $2",
                )
                .bind(avatar_id)
                .bind(at),
            };
            query.execute(&mut **tx).await?;
            Ok(())
        }

        async fn insert_callback(
            tx: &mut sqlx::Transaction<'static, Db>,
            callback: &NewCallback,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO fal_callbacks (id, job_id, received_at, request_id, headers, body, \
                 signature, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(callback.id)
            .bind(callback.job_id)
            .bind(callback.received_at)
            .bind(&callback.request_id)
            .bind(Json(&callback.headers))
            .bind(&callback.body)
            .bind(callback.signature.as_str())
            .bind(callback.outcome.as_str())
            .bind(callback.detail.as_ref().map(Json))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        async fn complete_idempotency(
            tx: &mut sqlx::Transaction<'static, Db>,
            done: &IdempotencyCompletion,
        ) -> StoreResult<()> {
            let written = sqlx::query(
                "UPDATE idempotency_keys SET response_status = $3, response_body = $4 \
                 WHERE tenant = $1 AND key = $2 AND response_status IS NULL \
                 AND claim_token = $5",
            )
            .bind(done.tenant)
            .bind(&done.key)
            .bind(i32::from(done.status))
            .bind(&done.body)
            .bind(done.token)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if written == 0 {
                // Another request took the key over (this one's claim looked abandoned): this
                // one's work is rolled back, so that the key's effects happen once.
                return Err(StoreError::UniqueTaken(
                    "the Idempotency-Key was completed by another request".into(),
                ));
            }
            Ok(())
        }
    };
}
pub(super) use shared_store_helpers;
