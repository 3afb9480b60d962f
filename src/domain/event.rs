//! What falgate tells its clients: one event per change a client cares about, of one of these
//! types. Each names the resource it carries (a job, an avatar or a batch).

use super::UnknownVariant;
use super::job::JobStatus;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// The type of an event: `<resource>.<what happened>`. A job's end is always told; the steps
/// before it may not be, when FAL's callback arrives before its answer to the submit is
/// recorded and the job moves from `pending` straight to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    /// FAL accepted the job into its queue.
    #[serde(rename = "job.submitted")]
    JobSubmitted,
    /// FAL started working on the job.
    #[serde(rename = "job.running")]
    JobRunning,
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    #[serde(rename = "job.failed")]
    JobFailed,
    #[serde(rename = "job.canceled")]
    JobCanceled,
    /// A training of the avatar was accepted (its job is pending).
    #[serde(rename = "avatar.training_started")]
    AvatarTrainingStarted,
    /// A training ended with an artifact; the avatar can generate.
    #[serde(rename = "avatar.ready")]
    AvatarReady,
    /// The avatar's latest training failed (an avatar that had an artifact before keeps it,
    /// and stays `ready`).
    #[serde(rename = "avatar.failed")]
    AvatarFailed,
    /// Every job of a generation batch has finished.
    #[serde(rename = "batch.completed")]
    BatchCompleted,
    /// Asked for by a client to try its endpoint; delivered to that endpoint alone.
    #[serde(rename = "webhook_endpoint.test")]
    WebhookEndpointTest,
}

/// The kind of resource an event carries in its `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventResource {
    Job,
    Avatar,
    Batch,
    WebhookEndpoint,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        Self::JobSubmitted,
        Self::JobRunning,
        Self::JobSucceeded,
        Self::JobFailed,
        Self::JobCanceled,
        Self::AvatarTrainingStarted,
        Self::AvatarReady,
        Self::AvatarFailed,
        Self::BatchCompleted,
        Self::WebhookEndpointTest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobSubmitted => "job.submitted",
            Self::JobRunning => "job.running",
            Self::JobSucceeded => "job.succeeded",
            Self::JobFailed => "job.failed",
            Self::JobCanceled => "job.canceled",
            Self::AvatarTrainingStarted => "avatar.training_started",
            Self::AvatarReady => "avatar.ready",
            Self::AvatarFailed => "avatar.failed",
            Self::BatchCompleted => "batch.completed",
            Self::WebhookEndpointTest => "webhook_endpoint.test",
        }
    }

    pub fn resource(self) -> EventResource {
        match self {
            Self::JobSubmitted
            | Self::JobRunning
            | Self::JobSucceeded
            | Self::JobFailed
            | Self::JobCanceled => EventResource::Job,
            Self::AvatarTrainingStarted | Self::AvatarReady | Self::AvatarFailed => {
                EventResource::Avatar
            }
            Self::BatchCompleted => EventResource::Batch,
            Self::WebhookEndpointTest => EventResource::WebhookEndpoint,
        }
    }

    /// The event of a job reaching `status`; none for `pending`, which a job is only when it
    /// is made (its 202 said so) or sent back to be submitted again.
    pub fn of_job_status(status: JobStatus) -> Option<Self> {
        match status {
            JobStatus::Pending => None,
            JobStatus::Submitted => Some(Self::JobSubmitted),
            JobStatus::Running => Some(Self::JobRunning),
            JobStatus::Succeeded => Some(Self::JobSucceeded),
            JobStatus::Failed => Some(Self::JobFailed),
            JobStatus::Canceled => Some(Self::JobCanceled),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(&Self::ALL, Self::as_str, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_reads_back_from_its_spelling_and_serializes_as_it() {
        for kind in EventType::ALL {
            assert_eq!(kind.as_str().parse::<EventType>(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
        }
        assert!("job.pending".parse::<EventType>().is_err());
    }

    #[test]
    fn a_job_status_names_its_event_and_pending_none() {
        assert_eq!(EventType::of_job_status(JobStatus::Pending), None);
        assert_eq!(
            EventType::of_job_status(JobStatus::Succeeded).map(EventType::resource),
            Some(EventResource::Job)
        );
    }
}
