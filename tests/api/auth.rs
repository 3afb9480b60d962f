//! API keys and tenants.

use crate::backend_tests;
use crate::execute_behind_the_apps_back;
use crate::support::*;
use reqwest::StatusCode;

backend_tests!(every_v1_route_needs_a_key);
async fn every_v1_route_needs_a_key(app: &TestApp) {
    let job = app.create_job(&app.key, "a cat").await;
    let id = job["id"].as_str().unwrap();
    for (method, path) in [
        ("POST", "/v1/jobs".to_owned()),
        ("GET", "/v1/jobs".to_owned()),
        ("GET", format!("/v1/jobs/{id}")),
        ("POST", format!("/v1/jobs/{id}/cancel")),
    ] {
        let method = method.parse().unwrap();
        let response = app
            .client
            .request(method, app.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="falgate""#
        );
        problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

backend_tests!(wrong_and_malformed_keys_are_refused);
async fn wrong_and_malformed_keys_are_refused(app: &TestApp) {
    let forged = format!("fgk_{}", "A".repeat(43));
    for header in [
        format!("Bearer {forged}"),
        "Bearer not-a-key".to_owned(),
        format!("Basic {}", app.key),
        app.key.clone(),
        "Bearer".to_owned(),
    ] {
        let response = app
            .client
            .get(app.url("/v1/jobs"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

backend_tests!(a_revoked_key_is_refused_and_the_others_are_unaffected);
async fn a_revoked_key_is_refused_and_the_others_are_unaffected(app: &TestApp) {
    let key = app.new_key("to revoke").await;
    assert_eq!(app.get_as(&key, "/v1/jobs").await.status(), StatusCode::OK);
    let prefix = &key[..12];
    assert!(
        app.store()
            .revoke_api_key(prefix, falgate::domain::now())
            .await
            .unwrap()
    );
    let refused = app.get_as(&key, "/v1/jobs").await;
    problem(refused, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let still = app.get_as(&app.key, "/v1/jobs").await;
    assert_eq!(still.status(), StatusCode::OK);
}

backend_tests!(a_key_never_sees_another_keys_jobs, without_workers);
async fn a_key_never_sees_another_keys_jobs(app: &TestApp) {
    let job = app.create_job(&app.key, "mine").await;
    let id = job["id"].as_str().unwrap();
    let other = app.new_key("other tenant").await;

    let get = app.get_as(&other, &format!("/v1/jobs/{id}")).await;
    problem(get, StatusCode::NOT_FOUND, "not_found").await;
    let cancel = app
        .client
        .post(app.url(&format!("/v1/jobs/{id}/cancel")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    problem(cancel, StatusCode::NOT_FOUND, "not_found").await;
    let list: serde_json::Value = app.get_as(&other, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(items(&list).len(), 0);

    // The owner still sees it, untouched by the other key's cancel.
    assert_eq!(app.job(id).await["status"], "pending");
}

backend_tests!(a_key_revoked_by_another_process_is_refused_within_a_second);
async fn a_key_revoked_by_another_process_is_refused_within_a_second(app: &TestApp) {
    let key = app.new_key("revoked elsewhere").await;
    // Authenticated a few times, so that this process remembers the key.
    for _ in 0..3 {
        assert_eq!(app.get_as(&key, "/v1/jobs").await.status(), StatusCode::OK);
    }

    // Revoked the way a replica or the CLI does it: in the database, not through this
    // process, which hears nothing of it.
    let revoke = "UPDATE api_keys SET revoked_at = created_at WHERE prefix = $1";
    let prefix = &key[..12];
    let revoked_at = std::time::Instant::now();
    let revoked = execute_behind_the_apps_back!(app, revoke, prefix);
    assert_eq!(revoked, 1);

    // Within the second the promise allows (and the time the refusing request itself takes),
    // it is refused, and stays refused.
    eventually("the revoked key to be refused")
        .within(falgate::store::API_KEY_TRUSTED_FOR + std::time::Duration::from_millis(250))
        .until(async || {
            let status = app.get_as(&key, "/v1/jobs").await.status();
            if status != StatusCode::UNAUTHORIZED {
                assert_eq!(status, StatusCode::OK);
            }
            (status == StatusCode::UNAUTHORIZED).then_some(())
        })
        .await;
    assert!(
        revoked_at.elapsed()
            < falgate::store::API_KEY_TRUSTED_FOR + std::time::Duration::from_millis(250),
        "a revoked key was still accepted after {:?}",
        revoked_at.elapsed()
    );
    for _ in 0..3 {
        assert_eq!(
            app.get_as(&key, "/v1/jobs").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // The test's own key, remembered too, is untouched.
    assert_eq!(
        app.get_as(&app.key, "/v1/jobs").await.status(),
        StatusCode::OK
    );
}
